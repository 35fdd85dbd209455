"""The user's command-line tools: moreh-smi, moreh-switch-model and the operator's moai-admin."""
