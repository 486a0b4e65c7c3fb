from cicada.cli import main

main(prog_name="cicada")
