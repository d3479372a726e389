# Install rules that span the tree: the CMake package (find_package(KeyMesh)
# -> KeyMesh::keymesh), the pkg-config file, the systemd unit and the example
# config. Targets install themselves in client/, client/keymeshctl/ and broker/.
#
#   cmake --install build --prefix P
#     P/bin/{keymesh-broker,keymeshctl}
#     P/lib/libkeymesh.so{,.0,.0.1.0}
#     P/include/keymesh/*.h               (public headers only)
#     P/lib/pkgconfig/keymesh.pc
#     P/lib/cmake/KeyMesh/*.cmake
#     P/lib/systemd/system/keymesh-broker.service
#     P/share/keymesh/keymesh.example.json
#     P/share/keymesh/python/keymesh/     (the Python package)
include(CMakePackageConfigHelpers)

set(KEYMESH_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/KeyMesh)

install(EXPORT KeyMeshTargets NAMESPACE KeyMesh:: DESTINATION ${KEYMESH_CMAKE_DIR})
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/KeyMeshConfig.cmake.in
  ${PROJECT_BINARY_DIR}/cmake/KeyMeshConfig.cmake
  INSTALL_DESTINATION ${KEYMESH_CMAKE_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/cmake/KeyMeshConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/cmake/KeyMeshConfig.cmake ${PROJECT_BINARY_DIR}/cmake/KeyMeshConfigVersion.cmake
  DESTINATION ${KEYMESH_CMAKE_DIR})

# pkg-config: the prefix is substituted at install time, so
# `cmake --install --prefix P` yields a .pc that points into P.
set(KEYMESH_PREFIX "@KEYMESH_PREFIX@")  # kept for the install-time pass
configure_file(${PROJECT_SOURCE_DIR}/cmake/keymesh.pc.in ${PROJECT_BINARY_DIR}/cmake/keymesh.pc.in @ONLY)
install(CODE "
  set(KEYMESH_PREFIX \"\${CMAKE_INSTALL_PREFIX}\")
  configure_file(\"${PROJECT_BINARY_DIR}/cmake/keymesh.pc.in\" \"${PROJECT_BINARY_DIR}/cmake/keymesh.pc\" @ONLY)
")
install(FILES ${PROJECT_BINARY_DIR}/cmake/keymesh.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)

# The systemd unit names /usr/local/bin; point it at the actual prefix.
install(CODE "
  file(READ \"${PROJECT_SOURCE_DIR}/scripts/keymesh-broker.service\" unit)
  string(REPLACE \"/usr/local/bin/\" \"\${CMAKE_INSTALL_PREFIX}/${CMAKE_INSTALL_BINDIR}/\" unit \"\${unit}\")
  file(WRITE \"${PROJECT_BINARY_DIR}/cmake/keymesh-broker.service\" \"\${unit}\")
")
install(FILES ${PROJECT_BINARY_DIR}/cmake/keymesh-broker.service DESTINATION lib/systemd/system)
install(FILES ${PROJECT_SOURCE_DIR}/scripts/keymesh.example.json DESTINATION ${CMAKE_INSTALL_DATADIR}/keymesh)
