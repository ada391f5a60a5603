// Include this instead of <catch2/catch.hpp>: LibTorch (Debian's, through glog) defines a CHECK
// macro too, and Catch's must be the one that wins.
#pragma once
#include <torch/torch.h>
#include <catch2/catch.hpp>
