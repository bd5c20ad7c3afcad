// CPU emulation (see latro_cuda_emulator.h): stands in for the CUDA header of this name.
#pragma once
#include "latro_cuda_emulator.h"
