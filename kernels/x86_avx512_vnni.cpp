// The AVX-512 kernels built with VNNI (vpdpbusd / vpdpwssd): same source, other flags.
#define HK_VNNI 1
#include "x86_avx512.cpp"
