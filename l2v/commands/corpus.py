"""``l2v encode-corpus INPUT OUTDIR``: stream a large corpus into resumable embedding shards."""

from __future__ import annotations

import argparse
import json
import os

from .inference import COMPILE_HELP, add_model_args, int_in, load_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "encode-corpus",
        help="encode a large jsonl/txt corpus into resumable .npy shards with ids",
        description=(
            "Stream INPUT (.jsonl objects with a text field, or .txt one text per line) and write embeddings to "
            "OUTDIR in shards (shard-NNNNNN.npy + shard-NNNNNN.ids.jsonl, then index.json). Run the same "
            "command again after an interruption: finished shards are skipped, none is duplicated. Several "
            "workers can share the job: --worker i --num-workers N (defaults come from RANK/WORLD_SIZE, so "
            "`torchrun --nproc_per_node 8 -m l2v encode-corpus ...` uses 8 GPUs)."),
    )
    p.add_argument("input", help="corpus file: .jsonl (one object per line) or plain text (one text per line)")
    p.add_argument("outdir", help="output directory (created; reused to resume)")
    add_model_args(p)
    p.add_argument("--field", default="text", help="jsonl: field holding the text (default: text)")
    p.add_argument("--id-field", default="id",
                   help="jsonl: field holding the row id (default: id; rows without it get their line number)")
    p.add_argument("--instruction", default=None, help="instruction prepended to every text (excluded from pooling)")
    p.add_argument("--batch-size", type=int_in(1), default=32, help="texts per forward pass (default 32)")
    p.add_argument("--shard-size", type=int_in(1), default=10_000, help="rows per shard (default 10000)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    p.add_argument("--out-dtype", default="float32", choices=["float32", "float16"],
                   help="dtype of the stored embeddings (default float32)")
    p.add_argument("--worker", type=int_in(0), default=None, help="this worker's index (default: $RANK or 0)")
    p.add_argument("--num-workers", type=int_in(1), default=None, help="number of workers (default: $WORLD_SIZE or 1)")
    p.add_argument("--max-shards", type=int_in(1), default=None,
                   help="stop after encoding this many shards in this run (resume later)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip malformed lines (counted in the log) instead of stopping with file:line")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.set_defaults(func=cmd_encode_corpus)


def cmd_encode_corpus(args: argparse.Namespace) -> int:
    from ..corpus_encode import CorpusJob, describe_encoder, encode_corpus
    from ..train.distributed import env_info

    info = env_info()
    worker = info.rank if args.worker is None else args.worker
    workers = info.world_size if args.num_workers is None else args.num_workers
    if args.device is None and info.world_size > 1:
        import torch

        if torch.cuda.is_available():
            args.device = f"cuda:{info.local_rank % torch.cuda.device_count()}"
    job = CorpusJob(input=args.input, outdir=args.outdir, field=args.field, id_field=args.id_field or None,
                    instruction=args.instruction, shard_size=args.shard_size, batch_size=args.batch_size,
                    normalize=args.normalize, out_dtype=args.out_dtype, worker=worker, num_workers=workers,
                    max_shards=args.max_shards, skip_bad_lines=args.skip_bad_lines)
    job.check()  # bad arguments fail before the model loads
    enc = load_from_args(args)
    job.model_info = describe_encoder(enc, args.adapter)
    summary = encode_corpus(enc, job, progress=not args.quiet and os.environ.get("L2V_NO_PROGRESS") is None)
    if not args.quiet:
        print(json.dumps(summary))
    return 0
