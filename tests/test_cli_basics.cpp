// What both programs say about themselves: --version (the project version and the build's git commit), a
// mistyped subcommand as a one-line usage error that names the nearest one, and --help within 100 columns.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "apps/lib/help_format.h"
#include "apps/lib/version.h"
#include "tests/support/command.h"

namespace fs = std::filesystem;

namespace {

using Result = resunet::test_support::CommandResult;
using resunet::test_support::build_dir;
Result run(const std::string& command) { return resunet::test_support::run_command(command); }

// Whether the source tree is a git checkout that holds `commit` (the tree may have moved on since the build).
bool source_has_commit(const std::string& commit) {
    return run("git -C " + std::string(RESUNET_SOURCE_DIR) + " cat-file -e " + commit + "^{commit}").code == 0;
}

bool in_git_checkout() { return run("git -C " + std::string(RESUNET_SOURCE_DIR) + " rev-parse HEAD").code == 0; }

void expect_version(const fs::path& binary, const std::string& program) {
    if (!fs::exists(binary)) GTEST_SKIP() << binary << " is not built";
    const Result r = run(binary.string() + " --version");
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_EQ(r.out, resunet::tool_version(program) + "\n");
    EXPECT_EQ(r.out.rfind(program + " " + RESUNET_PROJECT_VERSION, 0), 0u) << r.out;  // CMake's project(VERSION)
    if (in_git_checkout()) {  // "(git <hash>[-dirty])", a commit of this checkout
        const size_t start = r.out.find("(git ");
        ASSERT_NE(start, std::string::npos) << r.out;
        const std::string commit = r.out.substr(start + 5, r.out.find_first_of("-)", start) - start - 5);
        EXPECT_GE(commit.size(), 7u) << r.out;
        EXPECT_TRUE(source_has_commit(commit)) << r.out;
    }
}

}  // namespace

TEST(ProgramVersion, ResunetPrintsProjectVersionAndCommit) { expect_version(build_dir() / "apps" / "resunet", "resunet"); }

TEST(ProgramVersion, BenchResunetPrintsProjectVersionAndCommit) {
    expect_version(build_dir() / "bench" / "bench_resunet", "bench_resunet");
}

TEST(ProgramUsage, UnknownSubcommandIsOneLineNamingTheNearest) {
    const std::string resunet = (build_dir() / "apps" / "resunet").string();
    Result r = run(resunet + " predcit images/ --model m.safetensors --out pred/");
    EXPECT_EQ(r.code, 2) << r.out;
    EXPECT_NE(r.out.find("unknown subcommand 'predcit'"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("did you mean 'predict'?"), std::string::npos) << r.out;
    EXPECT_EQ(r.out.find('\n'), r.out.size() - 1) << r.out;
    r = run(resunet + " frobnicate");  // nothing near: the list of subcommands, no guess
    EXPECT_EQ(r.code, 2) << r.out;
    EXPECT_EQ(r.out.find("did you mean"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("summary, predict, train"), std::string::npos) << r.out;
    r = run(resunet);  // no subcommand at all: CLI11's own one-line error
    EXPECT_EQ(r.code, 2) << r.out;
}

namespace {

// The subcommands `resunet --help` lists (the lines under "Subcommands:").
std::vector<std::string> subcommands(const std::string& help) {
    std::vector<std::string> names;
    const size_t start = help.find("Subcommands:\n");
    if (start == std::string::npos) return names;
    std::istringstream lines(help.substr(start + 13));
    std::string line;
    while (std::getline(lines, line) && !line.empty()) {
        if (line.size() > 2 && line[0] == ' ' && line[2] != ' ') names.push_back(line.substr(2, line.find(' ', 2) - 2));
    }
    return names;
}

void expect_lines_at_most(const std::string& text, size_t width, const std::string& what) {
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) EXPECT_LE(line.size(), width) << what << ": " << line;
}

}  // namespace

TEST(ProgramUsage, HelpLinesAreAtMost100Characters) {
    const std::string resunet = (build_dir() / "apps" / "resunet").string();
    const Result top = run(resunet + " --help");
    ASSERT_EQ(top.code, 0) << top.out;
    expect_lines_at_most(top.out, 100, "resunet --help");
    const std::vector<std::string> names = subcommands(top.out);
    EXPECT_GE(names.size(), 8u) << top.out;  // summary, predict, train, cv, eval, quantize, plan, convert
    for (const std::string& name : names) {
        const Result r = run(resunet + " " + name + " --help");
        EXPECT_EQ(r.code, 0) << name << ": " << r.out;
        EXPECT_NE(r.out.find("--"), std::string::npos) << name << ": " << r.out;
        expect_lines_at_most(r.out, 100, "resunet " + name + " --help");
    }
    const fs::path bench = build_dir() / "bench" / "bench_resunet";
    if (fs::exists(bench)) {
        const Result r = run(bench.string() + " --help");
        EXPECT_EQ(r.code, 0) << r.out;
        expect_lines_at_most(r.out, 100, "bench_resunet --help");
    }
}

TEST(HelpFormat, WrapsLongLinesUnderTheirDescriptionColumn) {
    const std::string name = "  --flag TEXT" + std::string(30 - 13, ' ');
    const std::string text = "Usage: x\n" + name + std::string(60, 'a') + " " + std::string(30, 'b') + " c\nshort";
    EXPECT_EQ(resunet::wrap_help_text(text, 100),
              "Usage: x\n" + name + std::string(60, 'a') + "\n" + std::string(30, ' ') + std::string(30, 'b') + " c\nshort");
    const std::string word(120, 'w');  // longer than the room: kept whole
    EXPECT_EQ(resunet::wrap_help_text(word + " x", 100), word + "\nx");
}
