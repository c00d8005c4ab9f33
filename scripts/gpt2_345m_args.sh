# The GPT2 345M recipe of the 2019 README, shared by the pretrain_gpt2*.sh launchers (sourced, not run).
# The optimisation settings assume 64-way data parallelism.
GPT2_345M_ARGS=(
       --num-layers 24
       --hidden-size 1024
       --num-attention-heads 16
       --batch-size 8
       --seq-length 1024
       --max-position-embeddings 1024
       --train-iters 320000
       --resume-dataloader
       --train-data "${TRAIN_DATA:-wikipedia}"
       --lazy-loader
       --tokenizer-type GPT2BPETokenizer
       --cache-dir cache
       --split 949,50,1
       --lr 0.00015
       --lr-decay-style cosine
       --weight-decay 1e-2
       --clip-grad 1.0
       --warmup .01
       --checkpoint-activations
       --fp16
)
