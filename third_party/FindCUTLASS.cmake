# Finds the CUTLASS and CuTe headers shipped in the `nvidia-cutlass` wheel
# (cutlass_library/source/include), as the build's Python sees it: under `pip install .` that is
# pip's isolated build environment, where pyproject.toml's build requirements put the wheel when
# RTPLLM_CUDA is set. Set CUTLASS_INCLUDE_DIR to use another checkout.
# Defines CUTLASS_FOUND, CUTLASS_INCLUDE_DIR, CUTLASS_VERSION and the target CUTLASS::cutlass.
include(RtpllmPythonPackage)

rtpllm_python_package_dir(cutlass_library _rtpllm_cutlass_pkg)
find_path(CUTLASS_INCLUDE_DIR NAMES cutlass/cutlass.h cute/tensor.hpp
          HINTS "${_rtpllm_cutlass_pkg}/source/include")
if(CUTLASS_INCLUDE_DIR AND EXISTS "${CUTLASS_INCLUDE_DIR}/cutlass/version.h")
  rtpllm_header_version("${CUTLASS_INCLUDE_DIR}/cutlass/version.h" CUTLASS_VERSION
                        CUTLASS_MAJOR CUTLASS_MINOR CUTLASS_PATCH)
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(CUTLASS REQUIRED_VARS CUTLASS_INCLUDE_DIR VERSION_VAR CUTLASS_VERSION
  REASON_FAILURE_MESSAGE "no nvidia-cutlass wheel for ${Python_EXECUTABLE}: `pip install nvidia-cutlass` (needed with --no-build-isolation), or set CUTLASS_INCLUDE_DIR")

if(CUTLASS_FOUND AND NOT TARGET CUTLASS::cutlass)
  add_library(CUTLASS::cutlass INTERFACE IMPORTED)
  set_target_properties(CUTLASS::cutlass PROPERTIES INTERFACE_INCLUDE_DIRECTORIES "${CUTLASS_INCLUDE_DIR}")
endif()
mark_as_advanced(CUTLASS_INCLUDE_DIR)
