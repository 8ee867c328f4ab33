from proto import generate

print(generate(force=True))
