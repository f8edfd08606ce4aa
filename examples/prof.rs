use clt::backend::Grads;
use clt::backend::cpu::{adam, encode::encode_all, sparse::*};
use clt::clt::params::decoder_norms;
use std::time::Instant;
fn main() {
    let large = std::env::args().nth(1).is_some();
    let (l, d, f, b) = if large {
        (12, 768, 3072, 2048)
    } else {
        (5, 64, 4096, 4096)
    };
    let p = clt::bench::Problem::new(l, d, f, b, 32.0, 1.0, 0);
    let th = thresholds(&p.params);
    let norms = decoder_norms(&p.cfg, &p.params.w_dec);
    for _ in 0..2 {
        let t = Instant::now();
        let codes = encode_all(&p.cfg, &p.params, &p.x, b, &th, 1.0);
        let te = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let yhat = decode(&p.cfg, &p.params, &codes, &p.x, b);
        let td = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = residual(&yhat, &p.y, b, l, d);
        let tr = t.elapsed().as_secs_f64();
        let mut g = Grads::zeros(&p.cfg);
        let t = Instant::now();
        loss_and_grad(&p.cfg, &p.params, &norms, &p.x, &p.y, b, &p.obj, &mut g);
        let tl = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let gn = adam::grad_norm(&p.cfg, &p.params, &g, &norms);
        let tn = t.elapsed().as_secs_f64();
        let mut params = p.params.clone();
        let mut st = adam::AdamState::new(&p.cfg);
        let mut nn = norms.clone();
        let t = Instant::now();
        adam::step(
            &p.cfg,
            &Default::default(),
            &mut params,
            &mut st,
            &g,
            1e-7,
            1.0,
            &mut nn,
        );
        let ta = t.elapsed().as_secs_f64();
        let entries: usize = codes.iter().map(|c| c.feat.len()).sum();
        println!(
            "encode {te:.3} decode {td:.3} resid {tr:.3} loss_and_grad {tl:.3} (backward ≈ {:.3}) gradnorm {tn:.3} adam {ta:.3} entries/tok {:.1} gn {gn:.3}",
            tl - te - td - tr,
            entries as f64 / b as f64
        );
    }
}
