//! The tokenizer a GGUF file carries (`tokenizer.ggml.*`), rebuilt with the `tokenizers` crate:
//! GPT-2 byte-level BPE from the stored vocabulary and merges, digits split one by one (the
//! SmolLM pre-tokenizer), control tokens (`<|im_start|>`, …) as special tokens. No hub access.

use candle_core::quantized::gguf_file::Content;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

/// GGUF token types (llama.cpp): 3 = control, 4 = user-defined.
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

fn err(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("GGUF tokenizer: {e}"))
}

/// A tokenizer and its special ids.
pub struct GgufTokenizer {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// Beginning-of-sequence token id, if any.
    pub bos: Option<u32>,
    /// End-of-sequence token id.
    pub eos: u32,
}

impl GgufTokenizer {
    /// The tokenizer of GGUF file `ct`.
    pub fn from_gguf(ct: &Content) -> candle_core::Result<Self> {
        let md = |k: &str| ct.metadata.get(k).ok_or_else(|| err(format!("no `{k}` in the metadata")));
        let model = md("tokenizer.ggml.model")?.to_string()?;
        if model != "gpt2" {
            return Err(err(format!("tokenizer model `{model}` is not supported (gpt2 byte-level BPE only)")));
        }
        let tokens: Vec<String> = md("tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(|t| t.to_i32()).collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let merges: Merges = md("tokenizer.ggml.merges")?
            .to_vec()?
            .iter()
            .map(|m| {
                let m = m.to_string()?;
                let (a, b) = m.split_once(' ').ok_or_else(|| err(format!("malformed merge `{m}`")))?;
                Ok((a.to_string(), b.to_string()))
            })
            .collect::<candle_core::Result<_>>()?;
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(err)?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            Digits::new(true).into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
            .map(|(tok, _)| AddedToken::from(tok.clone(), true))
            .collect();
        tokenizer.add_special_tokens(&special);
        let id = |k: &str| ct.metadata.get(k).and_then(|v| v.to_u32().ok());
        let eos = id("tokenizer.ggml.eos_token_id").ok_or_else(|| err("no eos token id"))?;
        let add_bos = ct.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok()).unwrap_or(false);
        Ok(GgufTokenizer { tokenizer, bos: if add_bos { id("tokenizer.ggml.bos_token_id") } else { None }, eos })
    }

    /// Token ids of `text` (special tokens in the text are recognised).
    pub fn encode(&self, text: &str) -> candle_core::Result<Vec<u32>> {
        let enc = self.tokenizer.encode(text, false).map_err(err)?;
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The text of token ids `ids`.
    pub fn decode(&self, ids: &[u32]) -> candle_core::Result<String> {
        self.tokenizer.decode(ids, false).map_err(err)
    }

    /// A single-turn chat prompt in the ChatML template SmolLM2-Instruct uses.
    pub fn chat_prompt(user: &str) -> String {
        format!(
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        )
    }
}
