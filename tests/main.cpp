// Catch2's main. The CUDA tests' executable (LIBLLM_CUDA_TESTS) exits 77 when no CUDA device is
// usable, which CTest reports as skipped (SKIP_RETURN_CODE), not passed.
#ifdef LIBLLM_CUDA_TESTS
#define CATCH_CONFIG_RUNNER
#include <libllm/compat.h>
#include <catch2/catch.hpp>
#include <cstdio>

int main(int argc, char** argv) {
  if (!libllm::compat::cuda_available()) {
    std::puts("no CUDA device: the CUDA tests are skipped");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
#else
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
#endif
