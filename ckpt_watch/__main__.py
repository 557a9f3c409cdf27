from ckpt_watch.cli import main

main()
