#!/usr/bin/env python3
"""The reference peer for the speed suite (`cargo bench --bench speed`): the same cases at the same shapes, run
with what a user would otherwise use on a CPU: Hugging Face transformers + PEFT + bitsandbytes on PyTorch, fp32,
2 threads unless --threads says otherwise (see notes/performance.md).

    python benches/peer.py [CASE...] [--threads N] [--steps N] [--warmup N] [--steps-7b N]

CASE is one of generate, nf4, frozen-linear, train, mistral-7b-2layer (default: all). Each measurement runs in a
fresh subprocess (this script re-invokes itself with `--one`), so the peak RSS it reports (getrusage ru_maxrss of
that subprocess: interpreter, torch, model load and the steps) belongs to that case alone. Results go to stdout,
one JSON object per line; warnings and progress go to stderr.

Threads: PyTorch's OpenMP threads spin while they wait; on a machine shared with other busy processes that makes
the peer several times slower (small element-wise ops most of all), far more than it slows our rayon threads. Compare
on an otherwise idle machine; OMP_WAIT_POLICY=PASSIVE in the environment limits the damage when that is impossible.

Needs: pip install torch transformers peft bitsandbytes (measured with torch 2.15, transformers 5.23, peft 0.21.2,
bitsandbytes 0.50.2). Models are random-init from configs (seeded); the training models are written to a temp
directory and loaded from there with from_pretrained (the NF4 path quantizes at load, as QLoRA users do), the
generate model is used as built. Nothing is downloaded.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

THREADS = 2  # default; the Rust suite passes --threads with its own thread count
CASES = ["generate", "nf4", "frozen-linear", "train", "mistral-7b-2layer"]

# Never touch the network; stay on the CPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def emit(obj):
    obj.setdefault("loadavg", round(os.getloadavg()[0], 2))
    print(json.dumps(obj), flush=True)


def log(msg):
    print(f"peer: {msg}", file=sys.stderr, flush=True)


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss():
    """Linux: resets VmHWM to the current RSS, so that vmhwm_bytes() measures one phase."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def vmhwm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def token_ids(n):
    """The ids the Rust suite feeds: 3 + (i * 7919) % 31000."""
    import torch

    return torch.tensor([3 + (i * 7919) % 31000 for i in range(n)], dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------
# Model configurations (the Rust suite's shapes)


def model_config(name):
    from transformers import MistralConfig, MixtralConfig

    common = dict(
        vocab_size=32000,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        sliding_window=None,
        initializer_range=0.02,
    )
    # The training cases' shapes (hidden 512, intermediate 1536, 4 layers, 8/2 heads).
    small = dict(
        hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=4096, **common,
    )
    if name == "mistral":
        return MistralConfig(**small)
    if name == "mixtral":
        # Router aux loss in the training loss with coefficient 0.02, like our StepSettings::aux_coef.
        return MixtralConfig(
            num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.02,
            router_jitter_noise=0.0, **small,
        )
    if name == "generate":
        return MistralConfig(
            hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=32768, **common,
        )
    if name == "mistral-7b-2layer":
        return MistralConfig(
            hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=32768, **common,
        )
    raise ValueError(name)


def random_model(name, seed):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config(name), dtype=torch.float32)


def load_model(path, nf4):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if nf4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu", **kwargs)


def with_lora(model, moe, nf4, ckpt):
    """LoRA r=8, alpha 16 on all linear layers, PEFT's way; gradient checkpointing without reentrancy."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    gc_kwargs = {"use_reentrant": False}
    model.config.use_cache = False
    if nf4:
        # The QLoRA recipe: casts the non-quantized parameters to fp32 (they already are) and enables checkpointing.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=ckpt, gradient_checkpointing_kwargs=gc_kwargs
        )
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if moe:
        # transformers 5 stores Mixtral's experts fused, as 3-D nn.Parameters (experts.gate_up_proj
        # [E, 2I, H] and experts.down_proj [E, H, I]), not as nn.Linear w1/w2/w3. PEFT 0.21 adapts them only
        # through `target_parameters` (lora.ParamWrapper): one rank-r pair per expert per parameter, so w1 and w3
        # share one adapter on the fused gate_up_proj (we attach separate w1 and w3 adapters: the peer trains
        # fewer LoRA parameters on the experts), and the adapter is applied by materialising W + scale * B @ A for
        # every expert in every forward (and again in the recompute) instead of running the low-rank path on the
        # tokens. bitsandbytes quantizes only nn.Linear, so with an NF4 base the experts stay f32 in the peer
        # (only attention is NF4). The router (a plain nn.Parameter) is frozen and not adapted, as in ours.
        config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules=attention, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
        )
    else:
        config = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
            target_modules=attention + ["gate_proj", "up_proj", "down_proj"],
        )
    model = get_peft_model(model, config)
    model.train()
    return model


def param_counts(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# ---------------------------------------------------------------------------------------------------------------
# One measurement each (run in a fresh subprocess)


def one_write(args):
    """Writes a random-init model to args.dir (a separate process, so the case's RSS does not include it)."""
    model = random_model(args.model, seed=3 if args.model in ("mistral", "mixtral") else 1)
    model.save_pretrained(args.dir)


def one_train(args):
    """One training configuration: median step time of AdamW steps on batch 4 x 256, labels = inputs."""
    import torch

    moe = args.model == "mixtral"
    nf4 = args.base == "nf4"
    model = with_lora(load_model(args.dir, nf4), moe, nf4, args.ckpt)
    trainable, total = param_counts(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    b, t = 4, 256
    ids = token_ids(b * t).view(b, t)
    times, loss = [], None
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        loss = out.loss.item()
        if step >= args.warmup:
            times.append(elapsed)
    secs = median(times)
    emit({
        "case": "train", "model": args.model, "base": args.base, "ckpt": args.ckpt,
        "tokens_per_s": b * t / secs, "step_s": secs, "step_times_s": times, "loss": loss,
        "trainable_params": trainable, "total_params": total, "peak_rss_bytes": peak_rss_bytes(),
    })


def one_mistral_7b_2layer(args):
    """Mistral-7B-shaped, 2 layers, NF4 + double quant, LoRA r=8 on all linears, checkpointing: forward + backward
    of 512 tokens (no optimizer step, like ours)."""
    import torch

    start = time.perf_counter()
    model = with_lora(load_model(args.dir, True), False, True, True)
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_bytes()
    trainable, total = param_counts(model)
    ids = token_ids(512).view(1, 512)
    reset = reset_peak_rss()
    times, loss = [], None
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        loss = out.loss.item()
        if step >= args.warmup:
            times.append(elapsed)
    secs = median(times)
    emit({
        "case": "mistral-7b-2layer", "tokens_per_s": 512 / secs, "step_s": secs, "step_times_s": times,
        "loss": loss, "load_s": load_s, "trainable_params": trainable, "total_params": total,
        "peak_rss_bytes": peak_rss_bytes(), "peak_rss_after_load_bytes": rss_loaded,
        "step_peak_rss_bytes": vmhwm_bytes() if reset else None,
    })


class _Clock:
    """A generate() streamer that only records when each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.times = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def one_generate(args):
    """Prefill: one forward over the 256-token prompt filling a fresh KV cache (logits for the last position only,
    as generate does). Decode: model.generate greedy, 64 new tokens, with its KV cache; tokens/s over the 63 tokens
    after the first, as ours."""
    import torch
    from transformers import DynamicCache

    model = random_model("generate", seed=0).eval()
    total = sum(p.numel() for p in model.parameters())
    prompt = token_ids(256).view(1, 256)
    gen_kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(prompt[:, :16], attention_mask=torch.ones_like(prompt[:, :16]), max_new_tokens=4,
                       min_new_tokens=4, **gen_kwargs)  # warm-up
        prefill = []
        for _ in range(3):
            start = time.perf_counter()
            model(input_ids=prompt, past_key_values=DynamicCache(config=model.config), use_cache=True,
                  logits_to_keep=1)
            prefill.append(time.perf_counter() - start)
        clock = _Clock()
        start = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=64, min_new_tokens=64,
                             streamer=clock, **gen_kwargs)
        total_s = time.perf_counter() - start
    new = out.shape[1] - prompt.shape[1]
    decode_s = clock.times[-1] - clock.times[0]
    emit({
        "case": "generate", "params": total, "prompt_tokens": 256, "new_tokens": new,
        "prefill_tokens_per_s": 256 / median(prefill), "prefill_s": median(prefill),
        "generate_first_token_s": clock.times[0] - start, "decode_tokens_per_s": (len(clock.times) - 1) / decode_s,
        "generate_s": total_s, "peak_rss_bytes": peak_rss_bytes(),
    })


def best_of(runs, f):
    f()
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - start)
    return best


def rust_random(seed, n, std):
    """Not our Rng's stream, but the same distribution: uniform with standard deviation `std`."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g) * 2 - 1) * (std * 1.732)


def one_nf4(args):
    """bitsandbytes.functional.quantize_4bit / dequantize_4bit (NF4, blocksize 64) of a 4096 x 14336 f32 weight."""
    import bitsandbytes.functional as F

    rows, cols = 4096, 14336
    w = rust_random(9, rows * cols, 0.02).view(rows, cols)
    for dq in (False, True):
        secs = best_of(3, lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4"))
        emit({"case": "nf4", "op": "quantize", "double_quant": dq, "ms": secs * 1e3,
              "gparam_per_s": rows * cols / secs / 1e9})
    q, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    secs = best_of(3, lambda: F.dequantize_4bit(q, state))
    emit({"case": "nf4", "op": "dequantize", "double_quant": True, "ms": secs * 1e3,
          "gparam_per_s": rows * cols / secs / 1e9, "bits_per_param": (q.numel() * q.element_size() * 8
                                                                       + _state_bits(state)) / (rows * cols),
          "peak_rss_bytes": peak_rss_bytes()})


def _state_bits(state):
    bits = state.absmax.numel() * state.absmax.element_size() * 8
    if state.state2 is not None:
        bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8
        bits += state.state2.code.numel() * state.state2.code.element_size() * 8
    return bits


def one_frozen_linear(args):
    """512 x 4096 through a frozen 4096 x 4096 linear: forward, and the backward that needs only the input
    gradient; dense (F.linear) and NF4 (bnb Linear4bit); plus the plain matmul that also computes dW."""
    import torch
    import bitsandbytes as bnb

    m, n, k = 512, 4096, 4096
    w = rust_random(20, n * k, 0.02).view(n, k)
    x = rust_random(21, m * k, 1.0).view(m, k).requires_grad_(True)
    c = rust_random(22, m * n, 1.0).view(m, n)
    gflop = 2.0 * m * n * k / 1e9
    dense = torch.nn.Linear(k, n, bias=False)
    dense.weight.data.copy_(w)
    dense.weight.requires_grad_(False)
    q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
    q = q.to("cpu")  # quantizes
    for label, layer in (("dense", dense), ("nf4", q)):
        def fwd():
            # With autograd recording, as in training (and as ours); bitsandbytes' no-grad path is another kernel.
            layer(x)

        def both():
            x.grad = None
            (layer(x) * c).sum().backward()

        f = best_of(3, fwd)
        fb = best_of(3, both)
        emit({"case": "frozen-linear", "kind": label, "forward_ms": f * 1e3, "forward_gflops": gflop / f,
              "backward_ms": (fb - f) * 1e3, "backward_gflops": gflop / max(fb - f, 1e-9)})
    wv = w.clone().requires_grad_(True)

    def plain():
        x.grad = None
        wv.grad = None
        ((x @ wv.t()) * c).sum().backward()

    secs = best_of(3, plain)
    # Forward, input gradient and weight gradient: three matmuls of the same size.
    emit({"case": "frozen-linear", "kind": "plain", "forward_backward_ms": secs * 1e3, "gflops": 3 * gflop / secs,
          "peak_rss_bytes": peak_rss_bytes()})


# ---------------------------------------------------------------------------------------------------------------
# Driver


def run_one(argv):
    """Runs `--one ...` in a fresh interpreter; its JSON lines pass through to our stdout."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one"] + argv
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
    if proc.returncode != 0:
        emit({"case": "error", "argv": argv, "returncode": proc.returncode})
    return proc.returncode == 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cases", nargs="*", help=f"subset of {CASES} (default: all)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per configuration (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (default 1)")
    p.add_argument("--threads", type=int, default=THREADS, help=f"torch threads (default {THREADS})")
    p.add_argument("--steps-7b", type=int, default=1,
                   help="timed steps of mistral-7b-2layer, after --warmup (default 1; ours times one cold step)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--base", choices=["f32", "nf4"], help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.one:
        import warnings

        import torch

        warnings.filterwarnings("ignore", category=FutureWarning)  # gradient_checkpointing_enable's rename
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        args.ckpt = bool(args.ckpt)
        {
            "write": one_write, "train": one_train, "generate": one_generate, "nf4": one_nf4,
            "frozen-linear": one_frozen_linear, "mistral-7b-2layer": one_mistral_7b_2layer,
        }[args.cases[0]](args)
        return

    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {unknown}; cases: {CASES}")
    wanted = args.cases or CASES
    import torch, transformers, peft, bitsandbytes  # noqa: E401 (versions for the record)

    emit({"case": "peer", "torch": torch.__version__, "transformers": transformers.__version__,
          "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__, "threads": args.threads,
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})
    threads = ["--threads", str(args.threads)]
    steps = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    ok = True
    for case in CASES:
        if case not in wanted:
            continue
        log(f"running {case}")
        if case == "train":
            for model in ("mistral", "mixtral"):
                with tempfile.TemporaryDirectory(prefix="tramontane-peer-") as d:
                    ok &= run_one(["write", "--model", model, "--dir", d] + threads)
                    for base in ("f32", "nf4"):
                        for ckpt in (0, 1):
                            log(f"train {model} {base} ckpt={ckpt}")
                            ok &= run_one(["train", "--model", model, "--base", base, "--ckpt", str(ckpt),
                                           "--dir", d] + threads + steps)
        elif case == "mistral-7b-2layer":
            with tempfile.TemporaryDirectory(prefix="tramontane-peer-") as d:
                ok &= run_one(["write", "--model", case, "--dir", d] + threads)
                ok &= run_one([case, "--dir", d, "--steps", str(args.steps_7b), "--warmup", str(args.warmup)]
                              + threads)
        else:
            ok &= run_one([case] + threads)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
