"""rlhf-loop: a chat-model service with an online RLHF loop, as one import package.

The layers, each importing only the ones below it (tests/deploy/test_package.py checks):

    app/        the `rlhf` command, `rlhf up`, the one-machine loop, simulated users, GGUF import
    service/    the BentoML chat + feedback service          trainer/    votes -> reward model -> PPO -> versions
    core/       contracts, settings, policy store, models, broker, the embedded model, tastes
    kernels/    Triton ops for the trainer (token log-probs, KL)

service/ and trainer/ never import each other; core/lora.py is the LoRA version format both use.
"""
