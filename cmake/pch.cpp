// Compiles the precompiled header that apps and tests reuse (LibTorch's headers, parsed once).
