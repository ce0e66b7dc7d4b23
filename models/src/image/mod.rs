//! Image generation pieces. So far: CLIP's tokenizer, built from the BPE
//! file open-clip-torch ships (the real one Stable Diffusion's text
//! encoders were trained with).

pub mod clip_tokenizer;
