"""Build tiny, randomly initialised but *real* Hugging Face models for offline tests and benchmarks.

Why: the server must be exercised through exactly the ``from_pretrained`` path a real checkpoint takes,
but CI and dev boxes have no hub access and no GPU. So we construct genuine configs/weights/tokenizers
locally (tokenizers are trained on an embedded corpus) and ``save_pretrained`` them.

Usage: ``python -m serve_app.tiny_models [OUT_DIR] [--force] [--chat-preset tiny|bench]``
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

MARKER = "tiny_model.json"
SEED = 0

CORPUS = """\
The quick brown fox jumps over the lazy dog while the sun rises slowly above the quiet hills.
A helpful assistant answers questions clearly, politely and honestly. It explains what it knows,
admits what it does not know, and asks for more details when a request is unclear or ambiguous.
Hello! How are you today? I am fine, thank you. What would you like to talk about this morning?
Sea otters float on their backs in the cold water of the Pacific Ocean, holding hands so they do
not drift apart while they sleep. A cute baby sea otter rests on its mother's chest in the kelp.
Photographers love the golden hour, when warm light paints the mountains, rivers and old castles.
An astronaut riding a horse on the moon is a famous prompt for testing image generation models.
Cooking a good soup takes patience: chop onions, carrots and celery, then simmer them with herbs,
garlic, salt, pepper and a little olive oil until the kitchen smells wonderful and everyone is hungry.
Computers store numbers in binary. Programs written in Python, Rust, Go or JavaScript are translated
into instructions that the processor executes billions of times every second without complaint.
Large language models predict the next token given the previous tokens. They are trained on books,
articles, code and conversations, and they can summarize documents, translate languages and write poems.
Servers receive requests, schedule work on replicas, stream responses back to clients and report metrics
such as latency, throughput, queue length and memory usage so operators can scale the deployment.
In the spring the garden is full of tulips, daffodils and cherry blossoms; in autumn the leaves turn
red, orange and yellow before they fall. Winter brings snow, frozen lakes and long, peaceful evenings.
Mathematics studies numbers, shapes, patterns and change. One plus two equals three; seven times eight
equals fifty-six. Geometry measures angles and distances, and algebra solves equations for unknowns.
The library opens at nine o'clock and closes at six. Please return borrowed books within two weeks,
keep your voice down in the reading room, and remember that food and drinks are not allowed inside.
Trains, buses, bicycles and ships carry people across cities and continents. Travelers pack suitcases,
check their tickets, wave goodbye to friends and look forward to new adventures in faraway places.
A painter mixes blue and yellow to make green, adds white to soften the tone, and signs the canvas.
Music has rhythm, melody and harmony; a piano, a violin and a drum can play together in an orchestra.
Doctors recommend sleeping eight hours, drinking water, eating vegetables and walking every single day.
"Can you write a short story about a dragon who loves to read?" asked the child. "Of course," said the
assistant, "once upon a time, in a kingdom of mountains and clouds, there lived a gentle, curious dragon."
Weather forecast: cloudy with a chance of rain in the afternoon, strong winds near the coast, and clear
skies tonight. Temperatures between 12 and 18 degrees. Don't forget your umbrella and a warm jacket!
"""

CHAT_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (  # ChatML, with Qwen's places for tools and its `enable_thinking` switch
    "{%- if tools -%}{{- '<|im_start|>system\\n# Tools\\n' -}}"
    "{%- for tool in tools -%}{{- tool | tojson -}}{{- '\\n' -}}{%- endfor -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)
_LLAMA_COMMON: dict[str, Any] = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
CHAT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"dir": "tiny-llama", "vocab": 1536, "model": {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, **_LLAMA_COMMON}},
    "bench": {"dir": "bench-llama", "vocab": 1536, "model": {
        "hidden_size": 768, "num_hidden_layers": 10, "num_attention_heads": 12, "num_key_value_heads": 4,
        "intermediate_size": 2048, **_LLAMA_COMMON}},
}
CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
IMAGE_SPEC: dict[str, Any] = {
    "dir": "tiny-sd", "clip_merges": 512,
    "unet": {"block_out_channels": (32, 64), "layers_per_block": 1, "sample_size": 32, "in_channels": 4,
             "out_channels": 4, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
             "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 32,
             "attention_head_dim": 4, "norm_num_groups": 8},
    # Four VAE blocks give vae_scale_factor 8 like real SD, so latents stay small (1024px -> 128x128)
    # and callers' "multiple of 8" size logic is the same as for a real checkpoint.
    "vae": {"block_out_channels": (8, 16, 32, 32), "layers_per_block": 1, "latent_channels": 4,
            "norm_num_groups": 8, "sample_size": 256, "mid_block_add_attention": False,
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4},
    "text": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37,
             "max_position_embeddings": 77, "projection_dim": 32},
    "scheduler": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "steps_offset": 1},
}


def _spec_hash(spec: dict[str, Any]) -> str:
    """Hash everything that determines the output (spec, this file's code and corpus, library versions),
    so a changed recipe or an upgraded library triggers a rebuild instead of serving stale files."""
    payload = {"spec": spec, "seed": SEED, "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
               "libs": {lib: version(lib) for lib in ("torch", "transformers", "diffusers", "tokenizers")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _is_current(target: Path, digest: str) -> bool:
    """The marker is written last, so its presence with a matching hash means a complete build."""
    try:
        return json.loads((target / MARKER).read_text())["spec_hash"] == digest
    except (OSError, ValueError, KeyError):
        return False


def _make_readable(root: Path) -> None:
    """mkdtemp makes 0700 and safetensors writes 0600; the server may run as another user."""
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def _atomic_build(target: Path | str, spec: dict[str, Any], writer: Callable[[Path], dict[str, Any]],
                  force: bool) -> Path:
    """Build into a temp dir beside ``target`` and rename it in, so a crash never leaves a half model."""
    target = Path(target).resolve()
    digest = _spec_hash(spec)
    if not force and _is_current(target, digest):
        print(f"up to date: {target}")
        return target
    if not force and target.is_dir() and any(target.iterdir()) and not (target / MARKER).exists():
        raise FileExistsError(f"{target} exists and was not built by {__name__}; pass force=True to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    start = time.perf_counter()
    try:
        info = writer(tmp)
        (tmp / MARKER).write_text(json.dumps({"spec_hash": digest, **info}, indent=2) + "\n")
        _make_readable(tmp)
        if target.exists():
            os.replace(target, old)  # a directory cannot be renamed onto a non-empty one
        os.replace(tmp, target)
    except BaseException:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {target} ({time.perf_counter() - start:.2f}s)")
    return target


def _train_bpe(vocab_size: int, specials: list[str]) -> Any:
    """Train a byte-level BPE on CORPUS; offline and (without end_of_word_suffix) deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return tok


def _chat_tokenizer(vocab_size: int) -> Any:
    """Llama-style fast tokenizer: <s> prepended by the post-processor, ChatML-like chat template."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = _train_bpe(vocab_size, CHAT_SPECIALS)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=CHAT_TEMPLATE,
        model_max_length=2048, padding_side="left")


def _clip_tokenizer(num_merges: int) -> Any:
    """CLIP tokenizer from explicit vocab/merges (transformers 5 ignores vocab_file=/merges_file=).

    Base vocab is what CLIP needs at minimum: 256 byte symbols, each also with ``</w>``, plus the
    start/end tokens; merges learned from CORPUS only make prompts shorter, like real CLIP.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet(), key=ord)
    vocab = {ch: i for i, ch in enumerate(alphabet + [ch + "</w>" for ch in alphabet])}
    merges = _learn_merges(CLIPTokenizer(vocab=_with_clip_specials(vocab), merges=[]), num_merges)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return CLIPTokenizer(vocab=_with_clip_specials(vocab), merges=merges, model_max_length=77)


def _with_clip_specials(vocab: dict[str, int]) -> dict[str, int]:
    """Specials go last, as in the real CLIP vocab (ids 49406/49407 there)."""
    return {**vocab, **{token: len(vocab) + i for i, token in enumerate(CLIP_SPECIALS)}}


def _learn_merges(clip: Any, num_merges: int) -> list[tuple[str, str]]:
    """Plain-Python BPE over CLIP's own pre-tokenisation. Not the tokenizers trainer: with
    end_of_word_suffix it breaks count ties differently on every run, so builds were not reproducible."""
    backend = clip.backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for line in CORPUS.splitlines():
        for piece, _ in backend.pre_tokenizer.pre_tokenize_str(backend.normalizer.normalize_str(line)):
            words[(*piece[:-1], piece[-1] + "</w>")] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))  # highest count, then lexicographic: deterministic
        merges.append(best)
        words = Counter({_merge_word(word, best): count for word, count in words.items()})
    return merges


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        hit = word[i:i + 2] == pair
        out.append(pair[0] + pair[1] if hit else word[i])
        i += 2 if hit else 1
    return tuple(out)


def _count(*models: Any) -> int:
    return sum(p.numel() for m in models for p in m.parameters())


def _write_chat(tmp: Path, preset: dict[str, Any]) -> dict[str, Any]:
    """Tokenizer first, because the model's vocab_size must equal len(tokenizer)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = _chat_tokenizer(preset["vocab"])
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           (("bos", "<s>"), ("eos", "</s>"), ("pad", "<pad>"), ("im_end", "<|im_end|>"))}
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                         pad_token_id=ids["pad"], **preset["model"])
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).eval()
    # Stop on either </s> or the ChatML end-of-turn, like real chat checkpoints do.
    model.generation_config = GenerationConfig(bos_token_id=ids["bos"], eos_token_id=[ids["eos"], ids["im_end"]],
                                               pad_token_id=ids["pad"])
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    params = _count(model)
    print(f"chat model: {params:,} params, vocab {len(tok)}")
    return {"kind": "chat", "params": params, "vocab_size": len(tok)}


def _write_image(tmp: Path) -> dict[str, Any]:
    """Assemble a real StableDiffusionPipeline from tiny components; every part seeded for determinism."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = IMAGE_SPEC
    tok = _clip_tokenizer(spec["clip_merges"])
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(**spec["unet"])
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(**spec["vae"])
    torch.manual_seed(SEED + 2)
    text_config = CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id, **spec["text"])
    text_encoder = CLIPTextModel(text_config)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet,
        scheduler=EulerDiscreteScheduler(**spec["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp, safe_serialization=True)
    params = _count(unet, vae, text_encoder)
    print(f"image pipeline: {params:,} params, clip vocab {len(tok)}, vae_scale_factor {pipe.vae_scale_factor}")
    return {"kind": "image", "params": params, "vae_scale_factor": pipe.vae_scale_factor}


def build_chat_model(path: Path | str, preset: str = "tiny", force: bool = False) -> Path:
    """Build (or reuse) a Llama-style causal LM + tokenizer in folder ``path``."""
    spec = CHAT_PRESETS[preset]
    return _atomic_build(path, {"chat": spec, "template": CHAT_TEMPLATE}, lambda tmp: _write_chat(tmp, spec), force)


def build_image_pipeline(path: Path | str, force: bool = False) -> Path:
    """Build (or reuse) a tiny StableDiffusionPipeline in folder ``path``."""
    return _atomic_build(path, {"image": IMAGE_SPEC}, _write_image, force)


def build_all(out_dir: Path | str, force: bool = False, chat_preset: str = "tiny") -> dict[str, Path]:
    """Build both models under ``out_dir``; keys are ``"chat"`` and ``"image"``."""
    out = Path(out_dir)
    return {"chat": build_chat_model(out / CHAT_PRESETS[chat_preset]["dir"], chat_preset, force),
            "image": build_image_pipeline(out / IMAGE_SPEC["dir"], force)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.tiny_models", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default="./models", help="output folder (default: ./models)")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date build exists")
    parser.add_argument("--chat-preset", choices=sorted(CHAT_PRESETS), default="tiny",
                        help="tiny -> tiny-llama (~0.3M params); bench -> bench-llama (~65M params)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; fail fast rather than hang
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # one-shard "Writing model shards" bars
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # import-time torchvision fallback notices
    start = time.perf_counter()
    paths = build_all(args.out_dir, force=args.force, chat_preset=args.chat_preset)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    print(f"done in {time.perf_counter() - start:.2f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
