# Finds UCX as shipped in the `libucx-cu13` wheel (libucx/{include,lib}), falling back to a system
# install. Defines UCX_FOUND, UCX_INCLUDE_DIR, UCX_VERSION (UCP API version) and the targets
# UCX::ucs, UCX::uct and UCX::ucp (ucp links the other two).
include(RtpllmPythonPackage)

rtpllm_python_package_dir(libucx _rtpllm_ucx_pkg)
find_path(UCX_INCLUDE_DIR NAMES ucp/api/ucp.h HINTS "${_rtpllm_ucx_pkg}/include")
foreach(_rtpllm_ucx_lib IN ITEMS ucs uct ucp)
  string(TOUPPER "${_rtpllm_ucx_lib}" _rtpllm_ucx_upper)
  find_library(UCX_${_rtpllm_ucx_upper}_LIBRARY NAMES ${_rtpllm_ucx_lib} HINTS "${_rtpllm_ucx_pkg}/lib")
  mark_as_advanced(UCX_${_rtpllm_ucx_upper}_LIBRARY)
endforeach()
if(UCX_INCLUDE_DIR AND EXISTS "${UCX_INCLUDE_DIR}/ucp/api/ucp_version.h")
  rtpllm_header_version("${UCX_INCLUDE_DIR}/ucp/api/ucp_version.h" UCX_VERSION UCP_API_MAJOR UCP_API_MINOR)
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(UCX
  REQUIRED_VARS UCX_UCP_LIBRARY UCX_UCT_LIBRARY UCX_UCS_LIBRARY UCX_INCLUDE_DIR VERSION_VAR UCX_VERSION)

if(UCX_FOUND AND NOT TARGET UCX::ucp)
  foreach(_rtpllm_ucx_lib IN ITEMS ucs uct ucp)
    string(TOUPPER "${_rtpllm_ucx_lib}" _rtpllm_ucx_upper)
    add_library(UCX::${_rtpllm_ucx_lib} SHARED IMPORTED)
    set_target_properties(UCX::${_rtpllm_ucx_lib} PROPERTIES
      IMPORTED_LOCATION "${UCX_${_rtpllm_ucx_upper}_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${UCX_INCLUDE_DIR}")
  endforeach()
  set_target_properties(UCX::uct PROPERTIES INTERFACE_LINK_LIBRARIES UCX::ucs)
  set_target_properties(UCX::ucp PROPERTIES INTERFACE_LINK_LIBRARIES "UCX::uct;UCX::ucs")
endif()
mark_as_advanced(UCX_INCLUDE_DIR)
