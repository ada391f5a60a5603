# Fails when the installed libllmTargets.cmake links a library by absolute path (LibTorch's
# libc10.so, CUDA libraries): those must come from the consumer's own find_package(Torch).
file(READ "${TARGETS}" _text)
string(REGEX MATCH "INTERFACE_LINK_LIBRARIES \"[^\"]*\"" _links "${_text}")
if(NOT _links)
  message(FATAL_ERROR "${TARGETS}: no INTERFACE_LINK_LIBRARIES")
endif()
if(_links MATCHES "[;\"]/" OR _links MATCHES "libc10")
  message(FATAL_ERROR "${TARGETS} links by absolute path: ${_links}")
endif()
message(STATUS "exports ok: ${_links}")
