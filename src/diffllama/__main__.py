from diffllama.cli import main

main()
