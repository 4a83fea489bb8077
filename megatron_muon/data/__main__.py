from megatron_muon.data.corpus import main

main()
