"""mindeye-train: MindEye2 shared-subject pretraining, one-session fine-tuning and training from scratch.

    mindeye-train                                                           # pretrain subjects 1-7 (tiny world)
    mindeye-train mode=finetune subjects=[8] train_sessions=[1] init_from=<run>/checkpoint
    accelerate launch --config_file configs/accelerate/multi_gpu_ddp.yaml -m offline_training.train ...

The command only: the training itself is offline_training/trainer.py, imported when the command runs so
that --help and argument errors answer without loading torch.
"""
from __future__ import annotations

from omegaconf import DictConfig

from mindeye.cli import command, require_data_root


@command("train", "mindeye-train")
def main(cfg: DictConfig) -> None:
    require_data_root(cfg.data.root)
    from offline_training.trainer import train

    train(cfg)


if __name__ == "__main__":
    main()
