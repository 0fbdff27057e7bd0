# `cmake --install`: the libraries as a CMake package (find_package(resunet) -> resunet::engine and friends,
# cmake/resunetConfig.cmake.in), their public headers, the `resunet` program and the LICENSE.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(RESUNET_PACKAGE_LIBRARIES graph engine quant train data)
foreach(name ${RESUNET_PACKAGE_LIBRARIES})
  set_target_properties(resunet_${name} PROPERTIES EXPORT_NAME ${name})
  list(APPEND RESUNET_PACKAGE_TARGETS resunet_${name})
endforeach()
install(TARGETS ${RESUNET_PACKAGE_TARGETS} EXPORT resunetTargets
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS resunet RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})

# Public headers: those that keep oneDNN out of sight. A header that names dnnl, an *_impl.h, or one that
# includes either stays in the source tree, so a consumer never needs oneDNN's headers.
set(private_headers "")
set(candidates "")
foreach(name ${RESUNET_PACKAGE_LIBRARIES})
  file(GLOB headers RELATIVE ${CMAKE_SOURCE_DIR} CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/${name}/*.h)
  list(APPEND candidates ${headers})
endforeach()
foreach(header ${candidates})
  file(STRINGS ${CMAKE_SOURCE_DIR}/${header} hits REGEX "dnnl")
  if(hits OR header MATCHES "_impl\\.h$")
    list(APPEND private_headers ${header})
  endif()
endforeach()
set(changed TRUE)
while(changed)
  set(changed FALSE)
  foreach(header ${candidates})
    if(header IN_LIST private_headers)
      continue()
    endif()
    file(STRINGS ${CMAKE_SOURCE_DIR}/${header} includes REGEX "^#include \"")
    foreach(line ${includes})
      string(REGEX REPLACE "^#include \"([^\"]+)\".*" "\\1" included "${line}")
      if(included IN_LIST private_headers)
        list(APPEND private_headers ${header})
        set(changed TRUE)
        break()
      endif()
    endforeach()
  endforeach()
endwhile()
foreach(header ${candidates})
  if(NOT header IN_LIST private_headers)
    get_filename_component(folder ${header} DIRECTORY)
    install(FILES ${CMAKE_SOURCE_DIR}/${header} DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/${folder})
  endif()
endforeach()

set(package_dir ${CMAKE_INSTALL_LIBDIR}/cmake/resunet)
install(EXPORT resunetTargets NAMESPACE resunet:: DESTINATION ${package_dir})
# The folder of the oneDNN this build linked: the package looks there first (a 3.x prefix beside a system 2.6).
get_filename_component(RESUNET_DNNL_LIBRARY_DIR "${DNNL_LIBRARY}" DIRECTORY)
configure_package_config_file(${CMAKE_SOURCE_DIR}/cmake/resunetConfig.cmake.in
                              ${CMAKE_BINARY_DIR}/resunetConfig.cmake INSTALL_DESTINATION ${package_dir})
write_basic_package_version_file(${CMAKE_BINARY_DIR}/resunetConfigVersion.cmake
                                 VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_BINARY_DIR}/resunetConfig.cmake ${CMAKE_BINARY_DIR}/resunetConfigVersion.cmake
        DESTINATION ${package_dir})
install(FILES ${CMAKE_SOURCE_DIR}/LICENSE DESTINATION ${CMAKE_INSTALL_DATAROOTDIR}/doc/resunet)
