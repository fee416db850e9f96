# Which CUDA architectures flashdino._C is compiled for.
#
# Included by CMakeLists.txt. It also runs as a script, so that tests can check the choice
# without a CUDA compiler or a GPU:
#   cmake -DFLASHDINO_CUDA=AUTO [-DFLASHDINO_CUDA_ARCHITECTURES=...] [-DFLASHDINO_NVIDIA_SMI=/path]
#         [-DFLASHDINO_GPU_CAPS=8.6] [-DCUDA_VERSION=13.0] [-DCUDA_SUPPORTED=75;80;...]
#         -P cmake/FlashdinoCudaArchs.cmake
# prints `want_cuda=`, `archs=` and `note=` lines.
#
# The policy: a wheel (FLASHDINO_CUDA=ON, as cibuildwheel sets) carries every shipped
# architecture; a plain `pip install .` (AUTO) compiles only for the GPUs this machine can see,
# and no CUDA kernels at all when it sees none (compiling six architectures takes minutes on a
# small machine for kernels nothing there could run). FLASHDINO_CUDA_ARCHITECTURES overrides both.

cmake_policy(VERSION 3.24...4.4)  # also when run as a script (IN_LIST)

# The oldest architecture the kernels are written for (bf16 arithmetic).
set(FLASHDINO_MIN_ARCH 80)

# flashdino_shipped_archs(<out> <cuda_version>): SASS for each architecture a wheel supports, and
# PTX of the newest one so that later GPUs can still JIT-compile the kernels.
function(flashdino_shipped_archs out cuda_version)
  set(archs 80-real 86-real 89-real 90a-real)
  if(cuda_version AND cuda_version VERSION_LESS 12.8)
    list(APPEND archs 90-virtual)   # no sm_100 / sm_120 before CUDA 12.8: PTX for newer GPUs
  else()
    list(APPEND archs 100-real 120)
  endif()
  set(${out} "${archs}" PARENT_SCOPE)
endfunction()

# flashdino_detect_gpus(<caps_out> <note_out>): compute capabilities ("8.6;9.0") of the GPUs that
# nvidia-smi lists; "unknown" when it lists a GPU but not its capability (drivers older than 510);
# empty when no GPU is visible. FLASHDINO_GPU_CAPS (a list, or "none") replaces the detection.
function(flashdino_detect_gpus caps_out note_out)
  if(DEFINED FLASHDINO_GPU_CAPS)
    if(FLASHDINO_GPU_CAPS STREQUAL "none")
      set(${caps_out} "" PARENT_SCOPE)
    else()
      set(${caps_out} "${FLASHDINO_GPU_CAPS}" PARENT_SCOPE)
    endif()
    set(${note_out} "FLASHDINO_GPU_CAPS=${FLASHDINO_GPU_CAPS}" PARENT_SCOPE)
    return()
  endif()
  if(FLASHDINO_NVIDIA_SMI)
    set(smi "${FLASHDINO_NVIDIA_SMI}")
  else()
    find_program(_fd_nvidia_smi nvidia-smi)
    set(smi "${_fd_nvidia_smi}")
  endif()
  if(NOT smi)
    set(${caps_out} "" PARENT_SCOPE)
    set(${note_out} "nvidia-smi not found" PARENT_SCOPE)
    return()
  endif()
  execute_process(COMMAND "${smi}" --query-gpu=compute_cap --format=csv,noheader
                  OUTPUT_VARIABLE out ERROR_VARIABLE err RESULT_VARIABLE rc TIMEOUT 60)
  set(caps "")
  if(rc EQUAL 0)
    string(REGEX MATCHALL "[0-9]+\\.[0-9]+" caps "${out}")
    list(REMOVE_DUPLICATES caps)
  endif()
  if(caps)
    set(${caps_out} "${caps}" PARENT_SCOPE)
    string(REPLACE ";" ", " caps_text "${caps}")
    set(${note_out} "nvidia-smi sees compute capability ${caps_text}" PARENT_SCOPE)
    return()
  endif()
  # An old driver does not know the compute_cap field: does it list a GPU at all?
  execute_process(COMMAND "${smi}" -L OUTPUT_VARIABLE out ERROR_QUIET RESULT_VARIABLE rc TIMEOUT 60)
  if(rc EQUAL 0 AND out MATCHES "GPU [0-9]+:")
    set(${caps_out} "unknown" PARENT_SCOPE)
    set(${note_out} "nvidia-smi lists a GPU but not its compute capability" PARENT_SCOPE)
  else()
    set(${caps_out} "" PARENT_SCOPE)
    set(${note_out} "nvidia-smi sees no GPU" PARENT_SCOPE)
  endif()
endfunction()

# flashdino_want_cuda(<out> <note_out> <mode> <explicit_archs>): whether to look for nvcc at all.
function(flashdino_want_cuda out note_out mode explicit)
  if(mode STREQUAL "OFF")
    set(${out} OFF PARENT_SCOPE)
    set(${note_out} "FLASHDINO_CUDA=OFF" PARENT_SCOPE)
  elseif(mode STREQUAL "ON")
    set(${out} ON PARENT_SCOPE)
    set(${note_out} "FLASHDINO_CUDA=ON" PARENT_SCOPE)
  elseif(explicit)
    set(${out} ON PARENT_SCOPE)
    set(${note_out} "FLASHDINO_CUDA_ARCHITECTURES=${explicit}" PARENT_SCOPE)
  else()
    flashdino_detect_gpus(caps note)
    set(FLASHDINO_DETECTED_GPU_CAPS "${caps}" PARENT_SCOPE)
    if(caps)
      set(${out} ON PARENT_SCOPE)
    else()
      set(${out} OFF PARENT_SCOPE)
    endif()
    set(${note_out} "${note}" PARENT_SCOPE)
  endif()
endfunction()

# flashdino_select_cuda_archs(<archs_out> <note_out> <mode> <explicit> <gpu_caps> <cuda_version>
#                             <supported>): the CMAKE_CUDA_ARCHITECTURES entries to build. <supported>
# lists the architecture numbers nvcc can compile (`nvcc --list-gpu-arch`); empty = not known.
function(flashdino_select_cuda_archs archs_out note_out mode explicit caps cuda_version supported)
  if(explicit AND NOT explicit STREQUAL "all")
    string(REPLACE "," ";" archs "${explicit}")
    string(REPLACE " " ";" archs "${archs}")
    list(REMOVE_ITEM archs "")
    set(note "FLASHDINO_CUDA_ARCHITECTURES=${explicit}")
  elseif(mode STREQUAL "ON" OR explicit STREQUAL "all" OR caps STREQUAL "unknown")
    flashdino_shipped_archs(archs "${cuda_version}")
    if(caps STREQUAL "unknown" AND NOT mode STREQUAL "ON" AND NOT explicit)
      set(note "every shipped architecture (a GPU is visible but its compute capability is not)")
    else()
      set(note "every shipped architecture")
    endif()
  else()
    # AUTO with visible GPUs: SASS for each of them only.
    set(archs "")
    set(skipped "")
    foreach(cap IN LISTS caps)
      string(REPLACE "." "" arch "${cap}")
      if(arch LESS FLASHDINO_MIN_ARCH)
        list(APPEND skipped "sm_${arch} (older than sm_${FLASHDINO_MIN_ARCH}, the oldest the kernels support)")
      elseif(supported AND NOT arch IN_LIST supported)
        # A GPU newer than this nvcc: PTX of the newest architecture it knows, JIT-compiled by the driver.
        list(GET supported -1 newest)
        foreach(s IN LISTS supported)
          if(s GREATER newest)
            set(newest "${s}")
          endif()
        endforeach()
        list(APPEND archs "${newest}-virtual")
        list(APPEND skipped "sm_${arch} (CUDA ${cuda_version} cannot compile it: PTX for sm_${newest} instead)")
      else()
        list(APPEND archs "${arch}-real")
      endif()
    endforeach()
    list(REMOVE_DUPLICATES archs)
    string(REPLACE ";" ", " caps_text "${caps}")
    set(note "this machine's GPU: compute capability ${caps_text}")
    if(skipped)
      string(REPLACE ";" ", " skipped "${skipped}")
      set(note "${note}; not built for ${skipped}")
    endif()
  endif()
  set(${archs_out} "${archs}" PARENT_SCOPE)
  set(${note_out} "${note}" PARENT_SCOPE)
endfunction()

if(CMAKE_SCRIPT_MODE_FILE STREQUAL CMAKE_CURRENT_LIST_FILE)
  if(NOT DEFINED FLASHDINO_CUDA)
    set(FLASHDINO_CUDA AUTO)
  endif()
  flashdino_want_cuda(want want_note "${FLASHDINO_CUDA}" "${FLASHDINO_CUDA_ARCHITECTURES}")
  message("want_cuda=${want}")
  message("want_note=${want_note}")
  if(want)
    flashdino_select_cuda_archs(archs note "${FLASHDINO_CUDA}" "${FLASHDINO_CUDA_ARCHITECTURES}"
                                "${FLASHDINO_DETECTED_GPU_CAPS}" "${CUDA_VERSION}" "${CUDA_SUPPORTED}")
    message("archs=${archs}")
    message("note=${note}")
  endif()
endif()
