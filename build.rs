//! Build script: with the `cuda` feature, compiles every `kernels/*.cu` to PTX in `OUT_DIR` and generates
//! `kernels.rs`, a file of `pub const NAME: &str = include_str!(...)` constants that the CUDA backend embeds.
//! Without the feature it does nothing, so the crate builds on machines with no CUDA at all.
//!
//! The compiler is `$NVCC` if set, else `nvcc` on `PATH`; the architecture is `$CLT_CUDA_ARCH` (default
//! `sm_90`). `ptxas -v` statistics (registers, spills) are printed as cargo warnings when `$CLT_PTXAS_VERBOSE`
//! is set.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=ffi");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CLT_CUDA_ARCH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let arch = std::env::var("CLT_CUDA_ARCH").unwrap_or_else(|_| "sm_90".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let mut consts = String::new();
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("kernels")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    kernels.sort();
    for header in std::fs::read_dir("ffi")
        .into_iter()
        .flatten()
        .chain(std::fs::read_dir("kernels").into_iter().flatten())
        .flatten()
    {
        println!("cargo:rerun-if-changed={}", header.path().display());
    }
    for cu in &kernels {
        let stem = cu
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("kernel file name");
        let ptx = out.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-I", "ffi", "-I", "kernels"])
            .arg(format!("-arch={arch}"))
            .arg("-o")
            .arg(&ptx)
            .arg(cu)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed on {} ({s})", cu.display()),
            Err(e) => panic!(
                "the `cuda` feature needs the CUDA compiler, and `{nvcc}` could not be run ({e}). Install it with \
                 `pip install nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
                 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88` and set NVCC to site-packages/nvidia/cu13/bin/nvcc \
                 (see docs/gpu.md)"
            ),
        }
        consts.push_str(&format!(
            "pub const {}: &str = include_str!({:?});\n",
            stem.to_uppercase(),
            ptx.display().to_string()
        ));
        ptxas_report(&nvcc, &ptx, &arch);
    }
    std::fs::write(out.join("kernels.rs"), consts).expect("write kernels.rs");
}

fn ptxas_report(nvcc: &str, ptx: &Path, arch: &str) {
    if std::env::var_os("CLT_PTXAS_VERBOSE").is_none() {
        return;
    }
    let ptxas = Path::new(nvcc).with_file_name("ptxas");
    if let Ok(o) = Command::new(ptxas)
        .args(["-v", &format!("-arch={arch}"), "-o", "/dev/null"])
        .arg(ptx)
        .output()
    {
        for line in String::from_utf8_lossy(&o.stderr).lines() {
            println!("cargo:warning=ptxas {}: {line}", ptx.display());
        }
    }
}
