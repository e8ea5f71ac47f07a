//! The latent observation schedule of SPEC §4, run step by step for an engine.
//!
//! At prefill end the window keeps the last `max(W - gap, 1)` prompt queries (all W for SnapKV,
//! `gap = -1`, which compresses right away). Each of the next `gap` decode steps appends its query
//! (newest W kept). Decode step `gap + 1` is told to compress: the engine appends that step's K/V,
//! lets the step attend to the uncompressed cache, then calls `kv_compress` with
//! [`ObservationWindow::observation`]. One compression per request.

use std::collections::VecDeque;

use crate::config::DecodeConfig;
use crate::error::{Error, Result};
use crate::tensor::{DType, HostTensor, TensorView};

/// What the engine should do after feeding the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowEvent {
    /// Keep decoding over the full cache.
    Observing,
    /// Compress the cache now with `observation()` (after this step's attention).
    CompressNow,
    /// The request's one compression has happened; nothing more to observe.
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    AwaitPrefill,
    Observing,
    Done,
}

/// Rolling window of observation queries for one request (all sequences of a batch advance together).
#[derive(Clone, Debug)]
pub struct ObservationWindow {
    batch: usize,
    q_heads: usize,
    head_dim: usize,
    /// `B · Hq · D`: the values of one token's queries.
    token_len: usize,
    window: usize,
    gap: i64,
    /// Newest last; each entry is one token's queries `[B, Hq, D]`.
    queries: VecDeque<Vec<f32>>,
    steps: usize,
    state: State,
    /// `decode_budget + recompress_every`, when recompression is on (SPEC §7.5).
    recompress_at: Option<usize>,
}

impl ObservationWindow {
    /// An empty window for `batch` sequences of `q_heads` heads of `head_dim` elements.
    pub fn new(batch: usize, q_heads: usize, head_dim: usize, cfg: &DecodeConfig) -> Result<Self> {
        cfg.validate()?;
        for (what, n) in [("batch", batch), ("query heads", q_heads), ("head dim", head_dim)] {
            if n == 0 {
                return Err(Error::ZeroSize { what });
            }
        }
        let token_len = crate::alloc::count("one token's queries [B, Hq, D]", &[batch, q_heads, head_dim])?;
        Ok(ObservationWindow {
            batch,
            q_heads,
            head_dim,
            token_len,
            window: cfg.window,
            gap: cfg.decode_gap,
            // Grows with the queries fed (each backed by a caller's tensor), never to `window` up front.
            queries: VecDeque::new(),
            steps: 0,
            state: State::AwaitPrefill,
            recompress_at: (cfg.recompress_every > 0).then_some(cfg.decode_budget + cfg.recompress_every),
        })
    }

    /// Queries held now.
    pub fn len(&self) -> usize {
        self.queries.len()
    }
    /// Whether the window holds no queries.
    pub fn is_empty(&self) -> bool {
        self.queries.is_empty()
    }
    /// Decode steps fed so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    fn push_tokens(&mut self, q: &TensorView<'_>, from: usize) -> Result<()> {
        for t in from..q.shape()[1] {
            // q's shape matches and its buffer holds every element: this is bounded by the caller's memory.
            let mut tok = crate::alloc::with_capacity("an observation query", self.token_len)?;
            for b in 0..self.batch {
                for h in 0..self.q_heads {
                    tok.extend((0..self.head_dim).map(|d| q.get([b, t, h, d]) as f32));
                }
            }
            if self.queries.len() == self.window {
                self.queries.pop_front();
            }
            self.queries.push_back(tok);
        }
        Ok(())
    }

    fn check(&self, q: &TensorView<'_>, what: &'static str) -> Result<()> {
        q.check(what)?;
        let [b, n, h, d] = q.shape();
        if b != self.batch || h != self.q_heads || d != self.head_dim || n == 0 {
            return Err(Error::Shape {
                what,
                expected: format!("[{}, tokens >= 1, {}, {}] (BSND)", self.batch, self.q_heads, self.head_dim),
                got: q.shape().to_vec(),
            });
        }
        Ok(())
    }

    /// Feeds the prompt's queries (`[B, L, Hq, D]`, or just its last tokens).
    pub fn prefill_end(&mut self, q: TensorView<'_>) -> Result<WindowEvent> {
        if self.state != State::AwaitPrefill {
            return Err(Error::Window("prefill_end called twice".into()));
        }
        self.check(&q, "prompt queries")?;
        let keep = if self.gap < 0 { self.window } else { self.window.saturating_sub(self.gap as usize).max(1) };
        let l = q.shape()[1];
        self.push_tokens(&q, l.saturating_sub(keep))?;
        if self.gap < 0 {
            self.state = State::Done;
            Ok(WindowEvent::CompressNow)
        } else {
            self.state = State::Observing;
            Ok(WindowEvent::Observing)
        }
    }

    /// Feeds one decode step's queries (`[B, 1, Hq, D]`; several tokens are appended in order).
    pub fn decode_step(&mut self, q: TensorView<'_>) -> Result<WindowEvent> {
        match self.state {
            State::AwaitPrefill => return Err(Error::Window("decode_step before prefill_end".into())),
            State::Done => {
                self.steps += 1;
                if self.recompress_at.is_some() {
                    // Recompression scores with the last W queries: keep observing.
                    self.check(&q, "decode queries")?;
                    self.push_tokens(&q, 0)?;
                }
                return Ok(WindowEvent::Done);
            }
            State::Observing => {}
        }
        self.check(&q, "decode queries")?;
        self.steps += 1;
        if self.steps as i64 <= self.gap {
            self.push_tokens(&q, 0)?;
            Ok(WindowEvent::Observing)
        } else {
            self.state = State::Done;
            Ok(WindowEvent::CompressNow)
        }
    }

    /// Whether the cache, whose longest head now holds `longest` entries, is due for another
    /// compression (`recompress_every`, SPEC §7.5): after the first compression, once a head
    /// reaches `decode_budget + recompress_every` entries and the window is full.
    pub fn recompress_due(&self, longest: usize) -> bool {
        self.state == State::Done
            && self.queries.len() == self.window
            && self.recompress_at.is_some_and(|at| longest >= at)
    }

    /// The windows of several one-sequence requests stacked as `[sequences, Hq, W, D]`, the `obs`
    /// of `Kernels::kv_select` (each sequence its own window and schedule). A window holding fewer
    /// than W queries is zero-filled: pass `which = false` for its sequence.
    pub fn stack(windows: &[&ObservationWindow], dtype: DType) -> Result<HostTensor> {
        let first = windows.first().ok_or(Error::ZeroSize { what: "windows" })?;
        let (h, d, w) = (first.q_heads, first.head_dim, first.window);
        if let Some(bad) = windows.iter().find(|x| x.batch != 1 || x.q_heads != h || x.head_dim != d || x.window != w) {
            return Err(Error::Window(format!(
                "stacked windows must each hold one sequence of {h} heads × {d} with window {w} (got batch {}, {} heads, dim {}, window {})",
                bad.batch, bad.q_heads, bad.head_dim, bad.window
            )));
        }
        let n = windows.len();
        let mut out = crate::alloc::grid("the stacked observation windows", &[n, h, w, d], 0f32)?;
        for (i, win) in windows.iter().enumerate() {
            for (wi, tok) in win.queries.iter().enumerate() {
                for hi in 0..h {
                    let dst = ((i * h + hi) * w + wi) * d;
                    out[dst..dst + d].copy_from_slice(&tok[hi * d..(hi + 1) * d]);
                }
            }
        }
        Ok(HostTensor::from_f32(&out, [n, h, w, d], dtype))
    }

    /// The window as `[B, Hq, w, D]` in `dtype`, oldest query first: the `obs` of `kv_compress`.
    pub fn observation(&self, dtype: DType) -> HostTensor {
        let (b, h, d, w) = (self.batch, self.q_heads, self.head_dim, self.queries.len());
        // w tokens of B·Hq·D values each are held already: the product fits.
        let mut out = vec![0f32; self.token_len * w];
        for (wi, tok) in self.queries.iter().enumerate() {
            for bi in 0..b {
                for hi in 0..h {
                    let src = (bi * h + hi) * d;
                    let dst = ((bi * h + hi) * w + wi) * d;
                    out[dst..dst + d].copy_from_slice(&tok[src..src + d]);
                }
            }
        }
        HostTensor::from_f32(&out, [b, h, w, d], dtype)
    }
}
