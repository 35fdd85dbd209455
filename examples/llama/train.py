"""Train a small Llama-style decoder on the sample corpus: an ordinary single-GPU PyTorch script.

Byte-level tokens, RMSNorm, rotary position embeddings, SwiGLU feed-forward, causal grouped-query
attention (``F.scaled_dot_product_attention``), AdamW and gradient clipping. It runs on ``cuda``
when there is one (on the MoAI Platform: the virtual accelerator) and on the CPU otherwise, with
the same per-step losses for the same ``--seed``. ``--amp`` trains under ``torch.autocast`` in
bfloat16 (losses then differ from float32 runs, as on a real GPU).

    python train.py --steps 20 --batch-size 8
"""
import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

CORPUS = Path(__file__).with_name("corpus.txt")
VOCAB_SIZE = 256  # one token per byte


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(head_dim, max_len, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(max_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x: (batch, heads, seq, head_dim); rotate each (even, odd) pair by its position's angle.
    seq = x.shape[-2]
    cos, sin = cos[:seq], sin[:seq]
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, hidden):
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.feed_forward = FeedForward(dim, hidden)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


def hidden_size(dim):
    """SwiGLU's hidden width as Llama sizes it: 2/3 of 4 x dim, rounded up to a multiple of 4
    (172 for the default 64)."""
    return 4 * -(-(8 * dim // 3) // 4)


class Llama(nn.Module):
    def __init__(self, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=None, max_len=128):
        super().__init__()
        hidden = hidden or hidden_size(dim)
        self.embed = nn.Embedding(VOCAB_SIZE, dim)
        self.layers = nn.ModuleList(Block(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers))
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, VOCAB_SIZE, bias=False)
        cos, sin = rotary_tables(dim // n_heads, max_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin)
        return self.output(self.norm(x))


def sample_batch(data, batch_size, seq_len, generator):
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    window = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


def train_step(model, optimizer, inputs, targets, device_type, amp=False):
    """One optimizer step on a batch; returns the loss tensor, not yet read back."""
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        logits = model(inputs)
    loss = F.cross_entropy(logits.float().view(-1, VOCAB_SIZE), targets.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64, help="model width (4 heads, 2 of them for keys/values)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", action="store_true", help="train under torch.autocast (bfloat16)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(args.seed)
    data = torch.frombuffer(bytearray(CORPUS.read_bytes()), dtype=torch.uint8).long()
    generator = torch.Generator().manual_seed(args.seed)

    model = Llama(dim=args.dim, n_layers=args.layers, max_len=max(128, args.seq_len)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    tokens_per_step = args.batch_size * args.seq_len

    for step in range(1, args.steps + 1):
        started = time.time()
        inputs, targets = sample_batch(data, args.batch_size, args.seq_len, generator)
        inputs, targets = inputs.to(device), targets.to(device)
        loss = train_step(model, optimizer, inputs, targets, device, args.amp)
        if device == "cuda":
            torch.cuda.synchronize()
        loss_value = loss.item()
        duration = time.time() - started
        print(f"[Step {step}/{args.steps}] | Loss: {loss_value} | Duration: {duration:.2f} | "
              f"Throughput: {tokens_per_step / duration:.2f} tokens/sec", flush=True)


if __name__ == "__main__":
    main()
