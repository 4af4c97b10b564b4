class NoDraft:
    """A proposer that never drafts: the engine runs its speculative path with empty drafts."""
    def __init__(self, vllm_config):
        pass
    def propose(self, sampled_token_ids, *args, **kwargs):
        return [[] for _ in sampled_token_ids]
    def load_model(self, *a, **k):
        pass
