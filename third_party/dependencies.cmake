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

