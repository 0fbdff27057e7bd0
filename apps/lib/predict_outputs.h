// What `resunet predict` records of its outputs (internal to apps/lib): the rows of summary.json, and the removal
// of an earlier run's files before a run with --overwrite writes into the same folder.
//
// Intended usage (predict_command.cpp):
//   if (options.overwrite) remove_earlier_run(run);           // after every check, before the first write
//   rows += summary_row(run, item) + "\n";                       // one line per image, in input order
//   json["rows"] = rows_json(rows);
//
// summary.json lists every file the run wrote (its "files" and each row's "outputs"), so the next run with
// --overwrite removes exactly those: never a file predict did not make, and never a stale mask, overlay,
// probability map or metrics.csv that would look like the new run's.
#pragma once

#include <string>

#include <nlohmann/json_fwd.hpp>

#include "apps/lib/predict_pipeline.h"

namespace resunet {

inline constexpr const char* kPredictSummaryFormat = "resunet-predict";

// Removes the files the summary.json in run.out_dir lists as its run's own (a file of that name only, inside the
// folder, never an input or a ground-truth mask); a summary.json of another format, or unreadable, removes
// nothing. Returns how many files it removed.
size_t remove_earlier_run(const Run& run);

// One image's row of summary.json as one line of JSON: input, id, size, outputs and scores, or the error.
std::string summary_row(const Run& run, const Item& item);
// The rows, one JSON object a line, as a JSON array.
nlohmann::json rows_json(const std::string& rows);

}  // namespace resunet
