//! Build script. With the `cuda` feature:
//! - compiles every `kernels/*.cu` to PTX in `OUT_DIR` and generates `kernels.rs`, one
//!   `pub const NAME: &str = include_str!(...)` per kernel file, which the CUDA backend embeds;
//! - runs `ptxas -v` on each PTX and writes the registers / spills of every kernel to
//!   `OUT_DIR/ptxas-report.txt` (and to `$CLT_PTXAS_REPORT` when set); with `CLT_DENY_SPILLS=1` a spilling
//!   kernel fails the build;
//! - generates `ffi.rs`, the `#[repr(C)]` mirror of the parameter structs in `ffi/clt_params.h`, and
//!   `ffi_layout.rs` / `ffi_asserts.rs`, the sizes and offsets that the host C compiler (`$CC`, else `cc`)
//!   reports for the same header, as a table for a unit test and as compile-time assertions (so even
//!   `cargo check --features cuda` fails when the two layouts disagree).
//!
//! Without the feature it does nothing, so the crate builds on machines with no CUDA at all.
//!
//! The compiler is `$NVCC` if set, else `nvcc` on `PATH`, else the one `scripts/install-nvcc.sh` puts in
//! `.venv-cuda`; the architecture is `$CLT_CUDA_ARCH` (default `sm_90`), except for the files of
//! `SM90A_ONLY` (Hopper's `wgmma`), which are always compiled for `sm_90a`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const HEADER: &str = "ffi/clt_params.h";
const INSTALL_HINT: &str = "install the pinned CUDA 13.0 compiler with `scripts/install-nvcc.sh` (pip install \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 \
    nvidia-cuda-crt==13.0.88 into .venv-cuda) and rerun, or set NVCC to an nvcc binary; see docs/cuda.md";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=ffi");
    for var in [
        "NVCC",
        "CLT_CUDA_ARCH",
        "CLT_DENY_SPILLS",
        "CLT_PTXAS_REPORT",
        "CC",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let sources = list(&["kernels", "ffi"]);
    for f in &sources {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    ffi_bindings(&out);
    kernels(&out, &sources);
}

/// Every file in the given folders, sorted.
fn list(dirs: &[&str]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn find_nvcc() -> String {
    if let Ok(n) = std::env::var("NVCC") {
        return n;
    }
    if Command::new("nvcc").arg("--version").output().is_ok() {
        return "nvcc".into();
    }
    let venv = Path::new(".venv-cuda/lib");
    for py in std::fs::read_dir(venv).into_iter().flatten().flatten() {
        let cand = py.path().join("site-packages/nvidia/cu13/bin/nvcc");
        if cand.is_file() {
            return cand.display().to_string();
        }
    }
    panic!(
        "the `cuda` feature needs nvcc, which was not found (NVCC unset, no nvcc on PATH, no .venv-cuda): {INSTALL_HINT}"
    );
}

/// Kernel files compiled for `sm_90a` (they use `wgmma`), not for `$CLT_CUDA_ARCH`.
const SM90A_ONLY: &[&str] = &["encode_wgmma"];

fn kernels(out: &Path, sources: &[PathBuf]) {
    let arch = std::env::var("CLT_CUDA_ARCH").unwrap_or_else(|_| "sm_90".into());
    let nvcc = find_nvcc();
    let mut consts = String::new();
    let mut report = format!("ptxas -v, arch {arch} (sm_90a for {SM90A_ONLY:?})\n");
    let mut spills = Vec::new();
    for cu in sources
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
    {
        let stem = cu
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("kernel file name");
        let ptx = out.join(format!("{stem}.ptx"));
        // Hopper's warpgroup MMA exists only in the architecture-specific sm_90a target; the backend loads
        // that module only on a device of compute capability 9.x, whatever CLT_CUDA_ARCH says.
        let arch = if SM90A_ONLY.contains(&stem) {
            "sm_90a"
        } else {
            arch.as_str()
        };
        let res = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", "-I", "ffi", "-I", "kernels"])
            .arg(format!("-arch={arch}"))
            .arg("-o")
            .arg(&ptx)
            .arg(cu)
            .output();
        match res {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "nvcc failed on {} ({}):\n{}",
                cu.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!(
                "the `cuda` feature needs nvcc, and `{nvcc}` could not be run ({e}): {INSTALL_HINT}"
            ),
        }
        writeln!(
            consts,
            "/// PTX of `kernels/{stem}.cu`.\npub const {}: &str = include_str!({:?});",
            stem.to_uppercase(),
            ptx.display().to_string()
        )
        .unwrap();
        ptxas_report(&nvcc, &ptx, arch, &mut report, &mut spills);
    }
    std::fs::write(out.join("kernels.rs"), consts).expect("write kernels.rs");
    std::fs::write(out.join("ptxas-report.txt"), &report).expect("write ptxas report");
    if let Ok(p) = std::env::var("CLT_PTXAS_REPORT") {
        std::fs::write(&p, &report).unwrap_or_else(|e| panic!("write {p}: {e}"));
    }
    for s in &spills {
        println!("cargo:warning=kernel spills registers: {s}");
    }
    if !spills.is_empty() && std::env::var("CLT_DENY_SPILLS").is_ok_and(|v| v == "1") {
        panic!("kernels spill registers (CLT_DENY_SPILLS=1): {spills:?}\n{report}");
    }
}

/// Appends `ptxas -v`'s per-kernel lines to `report`; names the kernels with nonzero spills.
fn ptxas_report(nvcc: &str, ptx: &Path, arch: &str, report: &mut String, spills: &mut Vec<String>) {
    let ptxas = if nvcc.contains('/') {
        Path::new(nvcc).with_file_name("ptxas")
    } else {
        PathBuf::from("ptxas")
    };
    let o = Command::new(&ptxas)
        .args(["-v", &format!("-arch={arch}"), "-o", "/dev/null"])
        .arg(ptx)
        .output()
        .unwrap_or_else(|e| panic!("{} could not be run ({e}): {INSTALL_HINT}", ptxas.display()));
    let text = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        panic!("ptxas failed on {}:\n{text}", ptx.display());
    }
    let mut current = String::new();
    for line in text.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + 26..];
            current = rest[..rest.find('\'').unwrap_or(rest.len())].to_string();
        } else if line.contains("spill stores") {
            let spilled = line
                .split(',')
                .any(|part| part.contains("spill") && !part.trim().starts_with("0 bytes"));
            writeln!(report, "{current}: {}", line.trim()).unwrap();
            if spilled {
                spills.push(current.clone());
            }
        } else if line.contains("registers") {
            writeln!(
                report,
                "{current}: {}",
                line.trim_start_matches("ptxas info    : ")
            )
            .unwrap();
        }
    }
}

/// A struct of the header: name, (type, field) pairs, and whether a member is `CLT_ALIGN128` (the struct is
/// then 128-byte aligned). A field may be an array (`uint64_t opaque[16]`: type `[u64; 16]`).
struct CStruct {
    name: String,
    fields: Vec<(String, String)>,
    align128: bool,
}

/// Parses the typedef'd structs and `#define NAME 123u` constants of the header (its own plain style).
fn parse_header(text: &str) -> (Vec<CStruct>, Vec<(String, String)>) {
    let mut s = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        s.push_str(&rest[..i]);
        rest = &rest[i + 2..];
        rest = &rest[rest.find("*/").expect("unterminated comment") + 2..];
    }
    s.push_str(rest);
    let mut structs = Vec::new();
    let mut defines = Vec::new();
    let mut cur: Option<CStruct> = None;
    for line in s.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if let Some(d) = line.strip_prefix("#define ") {
            let mut it = d.split_whitespace();
            if let (Some(n), Some(v)) = (it.next(), it.next())
                && !n.ends_with("_H")
                && v.trim_end_matches('u').parse::<u64>().is_ok()
            {
                defines.push((n.to_string(), v.trim_end_matches('u').to_string()));
            }
        } else if line == "typedef struct {" {
            cur = Some(CStruct {
                name: String::new(),
                fields: Vec::new(),
                align128: false,
            });
        } else if let Some(name) = line.strip_prefix("} ") {
            let mut c = cur.take().expect("struct end without start");
            c.name = name.trim_end_matches(';').to_string();
            structs.push(c);
        } else if let Some(c) = cur.as_mut() {
            let mut decl = line.trim_end_matches(';');
            if let Some(rest) = decl.strip_prefix("CLT_ALIGN128 ") {
                c.align128 = true;
                decl = rest;
            }
            let (ty, name) = decl.rsplit_once(' ').expect("field declaration");
            let (ty, name) = match name.trim().split_once('[') {
                Some((n, len)) => (
                    format!("[{}; {}]", rust_type(ty.trim()), len.trim_end_matches(']')),
                    n.to_string(),
                ),
                None => (ty.trim().to_string(), name.trim().to_string()),
            };
            c.fields.push((ty, name));
        }
    }
    (structs, defines)
}

fn rust_type(c: &str) -> String {
    match c {
        "clt_ptr" | "uint64_t" => "u64".into(),
        "uint32_t" => "u32".into(),
        "float" => "f32".into(),
        other if other.starts_with("Clt") || other.starts_with('[') => other.into(),
        other => panic!("{HEADER}: no Rust mirror for the C type `{other}`"),
    }
}

fn ffi_bindings(out: &Path) {
    let text = std::fs::read_to_string(HEADER).expect("read ffi/clt_params.h");
    let (structs, defines) = parse_header(&text);
    let mut rs = String::from("// Generated by build.rs from ffi/clt_params.h: do not edit.\n");
    for (n, v) in &defines {
        writeln!(rs, "pub const {n}: u32 = {v};").unwrap();
    }
    for s in &structs {
        writeln!(
            rs,
            "/// Mirror of `{}` (ffi/clt_params.h).\n#[repr(C{})]\n#[derive(Clone, Copy, Debug, Default, PartialEq)]\npub struct {} {{",
            s.name,
            if s.align128 { ", align(128)" } else { "" },
            s.name
        )
        .unwrap();
        for (ty, f) in &s.fields {
            writeln!(rs, "    pub {f}: {},", rust_type(ty)).unwrap();
        }
        writeln!(
            rs,
            "}}\n// SAFETY: a plain #[repr(C)] struct of integers and floats, laid out as the kernels' C struct\n// (checked by ffi::tests::layout_matches_header), passed to kernels by value.\nunsafe impl cudarc::driver::DeviceRepr for {} {{}}",
            s.name
        )
        .unwrap();
    }
    // The Rust side's layout, as a function the test compares with the C compiler's.
    writeln!(rs, "/// (struct, field, offset) for every field and (struct, \"\", size) for every struct, as Rust lays them out.\npub fn rust_layout() -> Vec<(&'static str, &'static str, usize)> {{\n    vec![").unwrap();
    for s in &structs {
        writeln!(
            rs,
            "        ({:?}, \"\", std::mem::size_of::<{}>()),\n        ({:?}, \"(align)\", std::mem::align_of::<{}>()),",
            s.name, s.name, s.name, s.name
        )
        .unwrap();
        for (_, f) in &s.fields {
            writeln!(
                rs,
                "        ({:?}, {f:?}, std::mem::offset_of!({}, {f})),",
                s.name, s.name
            )
            .unwrap();
        }
    }
    rs.push_str("    ]\n}\n");
    std::fs::write(out.join("ffi.rs"), rs).expect("write ffi.rs");

    // The C compiler's layout of the same header.
    let mut c = String::from(
        "#include <stdio.h>\n#include <stddef.h>\n#include \"clt_params.h\"\nint main(void) {\n",
    );
    for s in &structs {
        writeln!(
            c,
            "    printf(\"(\\\"{0}\\\", \\\"\\\", %zu),\\n\", sizeof({0}));\n    printf(\"(\\\"{0}\\\", \\\"(align)\\\", %zu),\\n\", _Alignof({0}));",
            s.name
        )
        .unwrap();
        for (_, f) in &s.fields {
            writeln!(
                c,
                "    printf(\"(\\\"{0}\\\", \\\"{f}\\\", %zu),\\n\", offsetof({0}, {f}));",
                s.name
            )
            .unwrap();
        }
    }
    c.push_str("    return 0;\n}\n");
    let src = out.join("ffi_layout.c");
    let exe = out.join("ffi_layout");
    std::fs::write(&src, c).expect("write ffi_layout.c");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let st = Command::new(&cc)
        .args(["-std=c11", "-I", "ffi", "-o"])
        .arg(&exe)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "the host C compiler `{cc}` could not be run to check ffi/ layouts ({e}); set CC"
            )
        });
    assert!(st.success(), "{cc} failed on the generated ffi_layout.c");
    let o = Command::new(&exe).output().expect("run ffi_layout");
    let mut layout = String::from(
        "/// (struct, field, offset) and (struct, \"\", size) as the host C compiler lays out ffi/clt_params.h.\npub const C_LAYOUT: &[(&str, &str, usize)] = &[\n",
    );
    layout.push_str(&String::from_utf8_lossy(&o.stdout));
    layout.push_str("];\n");
    std::fs::write(out.join("ffi_layout.rs"), layout).expect("write ffi_layout.rs");
    // The same numbers as compile-time assertions, so even `cargo check --features cuda` catches a mismatch.
    let mut asserts = String::new();
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let parts: Vec<&str> = line
            .trim_matches(|c| c == '(' || c == ')' || c == ',')
            .split(", ")
            .map(|p| p.trim_matches('"'))
            .collect();
        let [st, field, n] = parts[..] else {
            panic!("unexpected ffi_layout line: {line}")
        };
        if field == "(align)" {
            writeln!(asserts, "const _: () = assert!(std::mem::align_of::<{st}>() == {n}, \"alignment of {st} differs from ffi/clt_params.h\");").unwrap();
        } else if field.is_empty() {
            writeln!(asserts, "const _: () = assert!(std::mem::size_of::<{st}>() == {n}, \"size of {st} differs from ffi/clt_params.h\");").unwrap();
        } else {
            writeln!(asserts, "const _: () = assert!(std::mem::offset_of!({st}, {field}) == {n}, \"offset of {st}.{field} differs from ffi/clt_params.h\");").unwrap();
        }
    }
    std::fs::write(out.join("ffi_asserts.rs"), asserts).expect("write ffi_asserts.rs");
}
