// The dense baseline's elementwise kernels: what a dense trainer (the Python CLT trainers) runs between its
// cuBLAS GEMMs, used only by src/backend/cuda/dense.rs to time the dense step the sparse one is measured
// against. The loss they produce is the CPU's (cpu/sparse.rs loss_and_grad: recon + sparsity + pre-act);
// the gradients are a dense trainer's (rectangle-kernel straight-through threshold), not compared with it.
//
// Reductions: a fixed grid (the wrapper's), a grid-stride loop with f64 accumulation per thread, a fixed
// tree per block (block_sum) and one partial per block, summed on the host: deterministic.
#include "common.cuh"

// h += b; a = JumpReLU(h) in bf16; partials of sum tanh(c a n) (active) and sum relu(theta - h) n.
CLT_KERNEL void __launch_bounds__(256) dense_jumprelu(const CltDenseActParams p) {
    __shared__ double scratch[8];
    float* h = ptr<float>(p.h);
    const float* bias = ptr<const float>(p.bias);
    const float* theta = ptr<const float>(p.theta);
    const float* norms = ptr<const float>(p.norms);
    __nv_bfloat16* act = ptr<__nv_bfloat16>(p.act_bf);
    double s_sp = 0.0, s_pre = 0.0;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const uint32_t f = (uint32_t)(i % p.n_features);
        const float v = h[i] + bias[f];
        const float th = theta[f], nf = norms[f];
        h[i] = v;
        const bool active = v > th;
        act[i] = __float2bfloat16_rn(active ? v : 0.f);
        if (active)
            s_sp += (double)tanhf(p.c * v * nf);
        else
            s_pre += (double)((th - v) * nf);
    }
    s_sp = block_sum(s_sp, scratch);
    s_pre = block_sum(s_pre, scratch);
    if (threadIdx.x == 0) {
        ptr<double>(p.part)[2 * blockIdx.x] = s_sp;
        ptr<double>(p.part)[2 * blockIdx.x + 1] = s_pre;
    }
}

// r = scale (yhat + b_dec - y), in place and in bf16; partials of the squared error.
CLT_KERNEL void __launch_bounds__(256) dense_residual(const CltDenseResidParams p) {
    __shared__ double scratch[8];
    float* yhat = ptr<float>(p.yhat);
    const float* b_dec = ptr<const float>(p.b_dec);
    const float* y = ptr<const float>(p.y);
    __nv_bfloat16* r = ptr<__nv_bfloat16>(p.r_bf);
    double s = 0.0;
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const float e = yhat[i] + b_dec[i % p.row] - y[i];
        s += (double)e * (double)e;
        const float v = p.scale * e;
        yhat[i] = v;
        r[i] = __float2bfloat16_rn(v);
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) ptr<double>(p.part)[blockIdx.x] = s;
}

// The JumpReLU's backward with the sparsity and pre-activation terms, per entry:
//   active (h > theta): dh = da + lambda/B c n (1 - tanh^2(c h n));
//   inactive: dh = -lambda_p/B n (the pre-activation loss relu(theta - h) n);
//   d/d log theta = theta (-(theta / eps) [|h - theta| < eps/2] g + [h < theta] lambda_p/B n), where g is
//   d loss / d a at the entry (da plus the sparsity derivative at a).
CLT_KERNEL void __launch_bounds__(256) dense_jumprelu_back(const CltDenseActBackParams p) {
    float* h = ptr<float>(p.h);
    float* da = ptr<float>(p.da);
    __nv_bfloat16* dh_bf = ptr<__nv_bfloat16>(p.dh_bf);
    const float* theta = ptr<const float>(p.theta);
    const float* norms = ptr<const float>(p.norms);
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const uint32_t f = (uint32_t)(i % p.n_features);
        const float v = h[i], th = theta[f], nf = norms[f];
        const bool active = v > th;
        const float a = active ? v : 0.f;
        const float t = tanhf(p.c * a * nf);
        const float g = da[i] + p.lambda_b * p.c * nf * (1.f - t * t);
        const float dh = active ? g : -p.lambda_pb * nf;
        const bool in_window = fabsf(v - th) < 0.5f * p.bandwidth;
        const float dth = (in_window ? -(th / p.bandwidth) * g : 0.f) + (active ? 0.f : p.lambda_pb * nf);
        da[i] = dh;
        dh_bf[i] = __float2bfloat16_rn(dh);
        h[i] = th * dth;
    }
}
