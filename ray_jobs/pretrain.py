r"""`ray job submit` entry point for pretraining: the same flags as `wr-train pretrain`.

    ray job submit --working-dir . -- python ray_jobs/pretrain.py \
        --config seed-base stages.0.shards=s3://b/shards128 stages.1.shards=s3://b/shards512 \
        --storage s3://b/runs --name base1

Inside a submitted job `ray.init()` attaches to the cluster (RAY_ADDRESS is set). Prints
the last checkpoint's path last; exits 2 with a one-line reason on bad input.
"""
import argparse
import sys

from wr_train.cli import add_pretrain_args, main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="ray_jobs/pretrain.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pretrain_args(parser)
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        parser.print_help()
        sys.exit(0)
    sys.exit(main(["pretrain", *sys.argv[1:]]))
