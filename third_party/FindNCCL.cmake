# Finds NCCL as shipped in the `nvidia-nccl-cu13` wheel (nvidia/nccl/{include,lib}), falling back
# to a system install. Set NCCL_INCLUDE_DIR / NCCL_LIBRARY to use another copy.
# Defines NCCL_FOUND, NCCL_INCLUDE_DIR, NCCL_LIBRARY, NCCL_VERSION and the target NCCL::nccl.
include(RtpllmPythonPackage)

rtpllm_python_package_dir(nvidia.nccl _rtpllm_nccl_pkg)
find_path(NCCL_INCLUDE_DIR NAMES nccl.h HINTS "${_rtpllm_nccl_pkg}/include")
# The wheel ships only the versioned soname, no libnccl.so development link.
find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS "${_rtpllm_nccl_pkg}/lib")
if(NCCL_INCLUDE_DIR)
  rtpllm_header_version("${NCCL_INCLUDE_DIR}/nccl.h" NCCL_VERSION NCCL_MAJOR NCCL_MINOR NCCL_PATCH)
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(NCCL REQUIRED_VARS NCCL_LIBRARY NCCL_INCLUDE_DIR VERSION_VAR NCCL_VERSION)

if(NCCL_FOUND AND NOT TARGET NCCL::nccl)
  add_library(NCCL::nccl SHARED IMPORTED)
  set_target_properties(NCCL::nccl PROPERTIES
    IMPORTED_LOCATION "${NCCL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
endif()
mark_as_advanced(NCCL_INCLUDE_DIR NCCL_LIBRARY)
