import os

# Before anything imports huggingface_hub (open_clip does), which reads HF_HUB_OFFLINE once, at import:
# set in conftest.py it came too late, and an accidental hub download retried for about a minute.
os.environ["HF_HUB_OFFLINE"] = "1"
