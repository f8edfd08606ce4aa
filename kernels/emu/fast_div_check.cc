// Checks common.cuh's FastDiv (the tiled kernels' division of an entry id by the list capacity) against
// the division operator: every divisor up to 70,000, 2,000 odd random ones and those around powers of 2,
// each with edge numerators (0, d - 1, d, multiples of d and one less, 2^32 - 1) and random ones.
// scripts/build-emu.sh builds and runs it (about a second); a wrong quotient fails the build.
#include <cstdio>
#include <random>
#include <vector>

#include "common.cuh"

int main() {
    std::mt19937_64 rng(1);
    uint64_t checks = 0, wrong = 0;
    auto check = [&](uint32_t n, uint32_t d, const FastDiv& f) {
        ++checks;
        if (divide(n, f) != n / d && wrong++ < 5) std::fprintf(stderr, "fast_div: %u / %u wrong\n", n, d);
    };
    std::vector<uint32_t> ds;
    for (uint32_t d = 1; d <= 70000; ++d) ds.push_back(d);
    for (int i = 0; i < 2000; ++i) ds.push_back((uint32_t)rng() | 1u);
    for (int k = 1; k < 32; ++k) {
        ds.push_back((1u << k) - 1);
        ds.push_back(1u << k);
        ds.push_back((1u << k) + 1);
    }
    ds.push_back(0xffffffffu);
    for (uint32_t d : ds) {
        const FastDiv f = fast_div(d);
        for (uint32_t n : {0u, 1u, d - 1, d, d + 1, 0x7fffffffu, 0x80000000u, 0xfffffffeu, 0xffffffffu}) check(n, d, f);
        for (int i = 0; i < 100; ++i) check((uint32_t)rng(), d, f);
        for (int i = 0; i < 30; ++i) {
            const uint64_t m = (rng() % ((uint64_t)(0xffffffffu / d) + 1)) * d;  // a multiple of d that fits
            check((uint32_t)m, d, f);
            if (m > 0) check((uint32_t)(m - 1), d, f);
        }
    }
    if (wrong > 0) {
        std::fprintf(stderr, "fast_div: %llu of %llu quotients wrong\n", (unsigned long long)wrong,
                     (unsigned long long)checks);
        return 1;
    }
    return 0;
}
