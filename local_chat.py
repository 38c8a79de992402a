"""Terminal chat with a model (KTransformers-compatible flags); same as `ktrans chat`.

    python local_chat.py                                  # tiny demo model, works anywhere
    python local_chat.py --gguf_path ~/models/DeepSeek-V3-Q4_K_M/
"""

import sys

from ktrans.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
