# CLI-level MPI tests: `resunet predict`, `eval` and `cv` under mpirun on loopback at -np 1, 2 and 3 (uneven
# shards), each against one process (tests/mpi_cli_test.sh), label `mpi`. Included by tests/CMakeLists.txt;
# MPIEXEC_EXECUTABLE comes from FindMPI (dist/CMakeLists.txt).
if(MPIEXEC_EXECUTABLE)
  foreach(ranks 1 2 3)
    add_test(NAME mpi_cli_np${ranks}
             COMMAND bash ${CMAKE_CURRENT_SOURCE_DIR}/mpi_cli_test.sh $<TARGET_FILE:resunet> ${MPIEXEC_EXECUTABLE}
                     ${RESUNET_SHARED_DIR} ${ranks})
    set_tests_properties(mpi_cli_np${ranks} PROPERTIES LABELS mpi TIMEOUT 300 FAIL_REGULAR_EXPRESSION "FAIL:")
  endforeach()
endif()
