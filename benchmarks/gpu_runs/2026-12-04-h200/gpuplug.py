def pytest_sessionfinish(session, exitstatus):
    import torch

    used = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print(f"\n[gpu] cuda available {torch.cuda.is_available()}, peak memory allocated in this process {used:.1f} MiB")
