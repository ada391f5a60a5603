# Dependency discovery only: every dependency comes from the system (Debian packages, or a
# prefix given in CMAKE_PREFIX_PATH such as a pip torch's torch.utils.cmake_prefix_path).
find_package(Torch REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(fmt REQUIRED)
find_package(nlohmann_json 3.2 REQUIRED)
# sentencepiece: its header and libraries by path, so that CMAKE_PREFIX_PATH decides (pkg-config
# could pair a system header with a prefix's library of another version: a crash at the first
# virtual call).
find_path(SENTENCEPIECE_INCLUDE_DIR sentencepiece_processor.h REQUIRED)
find_library(SENTENCEPIECE_LIBRARY sentencepiece REQUIRED)
get_filename_component(SENTENCEPIECE_LIBRARY_DIRS ${SENTENCEPIECE_LIBRARY} DIRECTORY)
add_library(sentencepiece::sentencepiece INTERFACE IMPORTED)
set_target_properties(sentencepiece::sentencepiece PROPERTIES INTERFACE_LINK_LIBRARIES ${SENTENCEPIECE_LIBRARY})
if(NOT SENTENCEPIECE_INCLUDE_DIR STREQUAL "/usr/include")  # never -isystem /usr/include
  set_target_properties(sentencepiece::sentencepiece PROPERTIES INTERFACE_INCLUDE_DIRECTORIES ${SENTENCEPIECE_INCLUDE_DIR})
endif()
if(LIBLLM_BUILD_TESTS)
  find_package(Catch2 2 REQUIRED)
endif()

