"""What the tests share: a real evd process and its log, real clients,
certificates, a loop to run until something holds, a stand-in journal."""
