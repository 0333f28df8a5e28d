"""`jaxcascade train` and `jaxcascade import-keras`: models trained here or converted from Keras."""

from __future__ import annotations

from pathlib import Path

from jaxcascade.commands.output import log, note_without_kernels, progress


def add_train(commands) -> None:
    p = commands.add_parser("train", help="train both stages (resumes an interrupted run)",
                            description="Train both stages of the cascade on labelled subjects (one folder each, or "
                                        "a BIDS dataset) into --workdir, or fine-tune a model with --init-from. "
                                        "Running the same command again resumes where it stopped.")
    p.add_argument("--data", required=True, help="folder with one sub-folder per subject")
    p.add_argument("--workdir", required=True, help="where the model, checkpoints and metrics go")
    p.add_argument("--config", help="config file with get_config(), or a packaged name: default (the paper's budget), "
                                     "demo (12 epochs), robust (N4, augmentation), synth (domain-randomised phantoms); "
                                     "with --init-from, a fine-tuning recipe such as oneshot. KEY=VALUE overrides "
                                     "follow as --config.train.max_epochs=50")
    p.add_argument("--init-from", metavar="MODEL",
                   help="fine-tune a trained, imported or shipped model, e.g. `--init-from default --config oneshot` "
                        "on one labelled subject of your scanner")
    p.add_argument("--participant-label", nargs="+", action="extend", metavar="LABEL",
                   help="train on these participants only (01 or sub-01; folder names in the folder layout)")
    p.set_defaults(run=cmd_train, overrides=True)


def cmd_train(args, overrides) -> None:
    from jaxcascade import api
    from jaxcascade.training.history import read_history

    note_without_kernels()
    api.train(args.data, args.workdir, config=args.config, overrides=overrides, init_from=args.init_from,
              participants=args.participant_label, log=log, progress=progress)
    epochs = {stage: len(records) for stage, records in read_history(Path(args.workdir)).items()}
    log(f"trained model in {args.workdir} (epochs: stage 1 {epochs[1]}, stage 2 {epochs[2]})")


def add_import_keras(commands) -> None:
    p = commands.add_parser("import-keras", help="import nicMSlesions' Keras model_1/model_2.hdf5 as a model",
                            description="Convert nicMSlesions' trained Keras networks (model_1.hdf5, model_2.hdf5) "
                                        "into a jaxcascade model directory that segment --model and train "
                                        "--init-from take (needs pip install -e '.[interop]').")
    p.add_argument("--model1", required=True, help="CNN1's Keras HDF5 file (model_1.hdf5)")
    p.add_argument("--model2", required=True, help="CNN2's Keras HDF5 file (model_2.hdf5)")
    p.add_argument("--modalities", required=True, metavar="T1,FLAIR",
                   help="input channel names in the networks' order (nicMSlesions baseline_2ch: T1,FLAIR)")
    p.add_argument("--out", required=True, help="new model directory for `segment --model`")
    p.set_defaults(run=cmd_import_keras)


def cmd_import_keras(args, _overrides) -> None:
    from jaxcascade.storage import interop

    modalities = tuple(name.strip() for name in args.modalities.split(",") if name.strip())
    provenance = interop.import_keras(args.model1, args.model2, modalities, args.out)
    log(f"wrote model {args.out} (network nicms, channels {','.join(modalities)}) from {provenance['source']}")
