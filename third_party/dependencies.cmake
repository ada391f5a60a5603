# Dependency discovery only: every dependency comes from the system (Debian packages, or a
# prefix given in CMAKE_PREFIX_PATH such as a pip torch's torch.utils.cmake_prefix_path).
find_package(Torch REQUIRED)
find_package(yaml-cpp REQUIRED)
find_package(fmt REQUIRED)
find_package(nlohmann_json 3.2 REQUIRED)
find_package(PkgConfig REQUIRED)
pkg_check_modules(SENTENCEPIECE REQUIRED IMPORTED_TARGET sentencepiece)
if(LIBLLM_BUILD_TESTS)
  find_package(Catch2 2 REQUIRED)
endif()

# Debian's libsentencepiece embeds (and exports) protobuf-lite, while Debian's LibTorch loads the
# full libprotobuf. Whichever comes first in the process's symbol lookup order wins, and if it is
# sentencepiece's copy, libprotobuf crashes in its static initialisers. Linking libprotobuf
# before sentencepiece makes the full (compatible, same-version) library win.
find_library(LIBLLM_PROTOBUF_LIBRARY NAMES libprotobuf.so.32 protobuf)
set(LIBLLM_EARLY_LIBS "")
if(LIBLLM_PROTOBUF_LIBRARY)
  set(LIBLLM_EARLY_LIBS "-Wl,--no-as-needed,${LIBLLM_PROTOBUF_LIBRARY}")
endif()
