# ctest InstallPackage.ExampleConsumer: installs the build into a fresh prefix, builds examples/ against it
# with find_package(resunet), as another project would, and runs the example on one image with the shipped
# model. With Kvasir-SEG in ../shared the image is a test-split one and its Dice against the mask must be
# at least 0.5 (a network that runs but computes nonsense scores near 0); without it, a corpus image.
# -D: BUILD_DIR, SOURCE_DIR, WORK_DIR, DATA_DIR, GENERATOR, CXX_COMPILER, LAUNCHER (may be empty).
function(run_step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "${what} failed (${status}):\n${out}\n${err}")
  endif()
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
set(prefix "${WORK_DIR}/prefix")
run_step("cmake --install" ${CMAKE_COMMAND} --install "${BUILD_DIR}" --prefix "${prefix}")
foreach(expected lib/cmake/resunet/resunetConfig.cmake include/engine/engine.h bin/resunet share/doc/resunet/LICENSE)
  if(NOT EXISTS "${prefix}/${expected}")
    message(FATAL_ERROR "the install lacks ${expected}")
  endif()
endforeach()
if(EXISTS "${prefix}/include/engine/lowering.h")
  message(FATAL_ERROR "a header that includes oneDNN (engine/lowering.h) was installed")
endif()

set(configure_args -S "${SOURCE_DIR}/examples" -B "${WORK_DIR}/build" -G "${GENERATOR}" -DCMAKE_BUILD_TYPE=Release
    "-DCMAKE_PREFIX_PATH=${prefix}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
if(LAUNCHER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER_LAUNCHER=${LAUNCHER}")
endif()
run_step("configuring examples/" ${CMAKE_COMMAND} ${configure_args})
run_step("building examples/" ${CMAKE_COMMAND} --build "${WORK_DIR}/build")

set(model "${SOURCE_DIR}/models/resunet-w64-s224/model.safetensors")
set(id cju0s690hkp960855tjuaqvv0)  # the first test id of models/resunet-w64-s224/split.json
if(EXISTS "${DATA_DIR}/images/${id}.jpg" AND EXISTS "${DATA_DIR}/masks/${id}.jpg")
  run_step("segment_image" "${WORK_DIR}/build/segment_image" "${model}" "${DATA_DIR}/images/${id}.jpg" "${DATA_DIR}/masks/${id}.jpg")
  if(NOT step_output MATCHES "polyp: [0-9.]+% of [0-9]+x[0-9]+ pixels\ndice: ([0-9.]+)")
    message(FATAL_ERROR "unexpected output of segment_image:\n${step_output}")
  endif()
  if(CMAKE_MATCH_1 LESS 0.5)
    message(FATAL_ERROR "segment_image's Dice on ${id} is ${CMAKE_MATCH_1}, expected at least 0.5")
  endif()
else()
  run_step("segment_image" "${WORK_DIR}/build/segment_image" "${model}" "${SOURCE_DIR}/fuzz/corpus/fuzz_image/color.jpg")
  if(NOT step_output MATCHES "polyp: [0-9.]+% of [0-9]+x[0-9]+ pixels")
    message(FATAL_ERROR "unexpected output of segment_image:\n${step_output}")
  endif()
endif()
message(STATUS "${step_output}")
file(REMOVE_RECURSE "${WORK_DIR}")
