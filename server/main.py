"""KTransformers-style entry point: `python server/main.py --model_path ... --gguf_path ...`.

Takes exactly the flags of `ktrans serve`.
"""

import sys

from ktrans.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
