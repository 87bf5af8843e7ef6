# rtpllm_python_package_dir(<module> <out_var>)
# Sets <out_var> to the directory of an installed Python (namespace) package, e.g. nvidia.nccl,
# as the build's Python interpreter sees it; empty when it is not installed. Wheel-shipped
# native dependencies (CUTLASS, NCCL, UCX) are found this way rather than copied into the tree.
include_guard(GLOBAL)

function(rtpllm_python_package_dir module out_var)
  if(NOT Python_EXECUTABLE)
    find_package(Python 3.9 QUIET COMPONENTS Interpreter)
  endif()
  set(dir "")
  if(Python_EXECUTABLE)
    execute_process(
      COMMAND "${Python_EXECUTABLE}" -c
              "import importlib.util as u\ntry:\n    s = u.find_spec('${module}')\nexcept ImportError:\n    s = None\nprint(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else '', end='')"
      OUTPUT_VARIABLE dir
      RESULT_VARIABLE status
      ERROR_QUIET)
    if(NOT status EQUAL 0)
      set(dir "")
    endif()
  endif()
  set(${out_var} "${dir}" PARENT_SCOPE)
endfunction()

# rtpllm_header_version(<header> <out_var> <MAJOR_MACRO> <MINOR_MACRO> [<PATCH_MACRO>])
# Reads "#define <MACRO> <number>" lines of a header into a dotted version string.
function(rtpllm_header_version header out_var)
  set(parts "")
  foreach(macro IN LISTS ARGN)
    file(STRINGS "${header}" line REGEX "^#define[ \t]+${macro}[ \t]+[0-9]+")
    string(REGEX REPLACE "^#define[ \t]+${macro}[ \t]+([0-9]+).*" "\\1" value "${line}")
    list(APPEND parts "${value}")
  endforeach()
  list(JOIN parts "." version)
  set(${out_var} "${version}" PARENT_SCOPE)
endfunction()
