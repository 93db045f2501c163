"""Synthetic releases laid out like the Mixtral 8x7B torrent, scaled down, for tests and benchmarks.

``synthesize(out)`` writes ``params.json``, ``consolidated.00.pth`` (or its ``-splitN`` parts),
``tokenizer.model`` and ``RELEASE`` into ``out``. The same arguments always give the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from pathlib import Path

import sentencepiece as spm
import torch

from weightswarm.convert.presets import VOCAB_SIZE, preset_args
from weightswarm.core.atomic import atomic_write_bytes, commit, discard, naming, temp_path
from weightswarm.core.errors import OptionError
from weightswarm.core.workdir import prepare, publish, resume
from weightswarm.formats.params import ModelArgs

CHECKPOINT = "consolidated.00.pth"
PARAMS = "params.json"
TOKENIZER = "tokenizer.model"
RELEASE = "RELEASE"
CORPUS = Path(__file__).parent / "data" / "corpus.txt"
WORK = ".synth"
def train_tokenizer(vocab_size: int = VOCAB_SIZE) -> bytes:
    """A SentencePiece BPE model trained on the bundled corpus, configured like Llama's and Mistral's."""
    lines = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,  # one thread keeps the merge order, and so the bytes, the same on every run
        minloglevel=2,  # training is quick and its log is noise
    )
    return model.getvalue()


def make_state_dict(args: ModelArgs, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded bf16 tensors with Mistral's names, in checkpoint order, each with its own storage.

    Matrices are normal with std fan_in**-0.5 (about what the real weights have, 0.016 at dim 4096),
    so activations keep unit scale and a wrong permutation shows up in the logits; norm weights are 1 +- 0.02.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in args.tensor_shapes():
        t = torch.empty(shape, dtype=torch.bfloat16)  # filled in place: no float32 copy of a big tensor
        if len(shape) == 1:
            t.normal_(1.0, 0.02, generator=gen)
        else:
            t.normal_(0.0, shape[-1] ** -0.5, generator=gen)
        tensors[name] = t
    return tensors


def synthesize(out: str | os.PathLike, preset: str = "tiny", split: int | None = None, seed: int = 0) -> list[Path]:
    """Write a synthetic release into the new or empty folder ``out``; return the written paths.

    With ``split`` the checkpoint is written as ``consolidated.00.pth-split0``, ``-split1``, ... of
    ``split`` bytes each (the last shorter), as the Hugging Face mirrors did; RELEASE still carries
    the md5 of the whole file. Every file appears under its final name only once complete.
    """
    if split is not None and split <= 0:
        raise OptionError("--split", split, "must be a positive number of bytes")
    preset_args(preset)  # an unknown preset is refused before anything is written
    out = Path(out)
    job = {"preset": preset, "split": split, "seed": seed}
    done = resume(out, WORK, job)
    if done is not None:  # an earlier run was killed while moving its files into place
        return done
    # Everything is written in OUT/.synth and moved up at the end (core.workdir): a run that dies (a full
    # disk, kill -9) leaves only that folder, which the same command replaces.
    work = prepare(out, WORK, job, reuse=False)
    tokenizer = train_tokenizer()
    # params.json must name the tokenizer's real piece count, whatever the trainer made of VOCAB_SIZE.
    args = preset_args(preset, spm.SentencePieceProcessor(model_proto=tokenizer).get_piece_size())
    # One line plus a newline: the shipped 8x7B params.json is json.dumps' 192 bytes + 1.
    params = json.dumps(args.to_dict()) + "\n"
    written = [atomic_write_bytes(work / PARAMS, params.encode()), atomic_write_bytes(work / TOKENIZER, tokenizer)]
    sink = _PartWriter(work, split)
    try:
        torch.save(make_state_dict(args, seed), sink)
        sink.finish()
    except RuntimeError:
        sink.abort()
        if sink.error is not None:  # torch reports a failed write without its errno and file
            raise sink.error from None
        raise
    except BaseException:
        sink.abort()
        raise
    written += sink.paths
    sums = f"{sink.md5.hexdigest()}  {CHECKPOINT}\n{hashlib.md5(tokenizer).hexdigest()}  {TOKENIZER}\n"
    written.append(atomic_write_bytes(work / RELEASE, sums.encode()))
    return publish(work, [p.name for p in written])  # RELEASE last: its presence says the rest is complete


class _PartWriter(io.RawIOBase):
    """The stream torch.save writes to: hashes everything and cuts it into files of ``split`` bytes.

    A stream rather than a path also keeps the temp name out of the archive: torch.save(path) names
    the zip's top folder after the file it writes to.
    """

    def __init__(self, out: Path, split: int | None):
        super().__init__()
        self.out, self.split = out, split
        self.error: OSError | None = None  # the write error torch.save turns into a bare RuntimeError
        self.md5 = hashlib.md5()
        self.paths: list[Path] = []  # final names, in order
        self._file: io.BufferedWriter | None = None
        self._room = 0  # bytes the current part can still take

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        self.md5.update(view)
        try:
            while view:
                if not self._room:
                    self._next_part()
                n = min(self._room, len(view))
                self._file.write(view[:n])
                self._room -= n
                view = view[n:]
        except OSError as e:
            self.error = naming(e, self.paths[-1])
            raise
        return size

    def _next_part(self) -> None:
        # Parts are opened only when there is data for them, so an exact multiple leaves no empty last part.
        if self._file:
            commit(self._file, self.paths[-1])
        name = CHECKPOINT if self.split is None else f"{CHECKPOINT}-split{len(self.paths)}"
        self.paths.append(self.out / name)
        self._file = open(temp_path(self.paths[-1]), "wb")
        self._room = self.split or sys.maxsize  # unsplit: one part that never fills

    def finish(self) -> None:
        if self._file:
            commit(self._file, self.paths[-1])
            self._file = None

    def abort(self) -> None:
        """Remove the part being written; completed parts keep their (whole) contents."""
        if self._file:
            discard(self._file)
            self._file = None
