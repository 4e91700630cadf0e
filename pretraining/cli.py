"""``ssp_pretrain``: not implemented yet (it lands with the pretraining-engine issue)."""
import sys


def main(argv=None) -> int:
    print("ssp_pretrain: not implemented yet. Pretraining lands with the SSP pretraining engine; until then, "
          "write a contract checkpoint with nnunet_ssp.checkpoint.save_checkpoint.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
