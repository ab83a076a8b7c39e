"""Fixtures shared by the tests of ``epmq``.

``tiny`` / ``bench``: a module that sets ``WRITE_TINY`` (one of ``epmq.benches.tiny``'s
``write_tiny_*``) and ``TASKS`` gets ``tiny`` = ``(root, config)`` of that tiny bench, written
once per module, and ``bench`` = the bench built from it.

``held_elsewhere``: ``with held_elsewhere("hold_output", out) as pid:`` runs the body while another
process (``pid``) holds ``out`` by ``epmq.resume``'s lock of that name.

``headless_encoder_decoder``: ``headless_encoder_decoder(family, vocab_size)`` builds a tiny random-init
T5Model (``family`` "t5") or BartModel, the encoder-decoders without a head, whose forward takes no labels.
"""

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

import epmq

from epmq.benches import build_bench


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    write = request.module.WRITE_TINY
    root = tmp_path_factory.mktemp(write.__name__.removeprefix("write_"))
    return root, write(root, request.module.TASKS)


@pytest.fixture(scope="module")
def bench(tiny):
    root, config = tiny
    return build_bench(config, base_dir=root, progress=False)


@pytest.fixture
def held_elsewhere():
    @contextmanager
    def held(lock: str, out):
        first = subprocess.Popen(
            [sys.executable, "-c", f"import sys\nfrom epmq.resume import {lock}\nwith {lock}(sys.argv[1]):\n"
             "    print('held', flush=True)\n    sys.stdin.readline()\n", str(out)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(epmq.__file__).parents[1]),
                                                                           os.environ.get("PYTHONPATH")]))))
        try:
            assert first.stdout.readline().strip() == "held"
            yield first.pid
        finally:
            first.communicate("\n")

    return held


@pytest.fixture
def headless_encoder_decoder():
    import transformers

    def build(family: str, vocab_size: int = 32):
        if family == "t5":
            return transformers.T5Model(transformers.T5Config(vocab_size=vocab_size, d_model=16, d_kv=4, d_ff=32,
                                                              num_layers=1, num_heads=4, decoder_start_token_id=0))
        return transformers.BartModel(transformers.BartConfig(
            vocab_size=vocab_size, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64))

    return build
