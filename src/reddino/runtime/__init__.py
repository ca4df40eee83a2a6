"""What every entry point shares and no model or data code needs: config resolvers and checks, user
errors, process-group helpers, DDP child processes, the GPU fast path, dashboard logging, Markdown tables."""
