"""Generation: KV cache (`cache`), sampling warpers (`sampling`), the jit-compiled loop
(`generate`) and beam search (`beam`)."""
