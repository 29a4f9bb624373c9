import json,sys,re,collections
d=json.load(open(sys.argv[1])); n=int(sys.argv[2]) if len(sys.argv)>2 else 25
ft=d['ftbl']; pps=d['pps']
tot=sum(p.get('gb',0) for p in pps)
print("bytes at global peak: %.1f MiB (tgmax field %s)"%(tot/2**20, d.get('tgmax')))
def label(p):
    fr=[ft[i] for i in p['fs']]
    # first frame from kproxy code, skipping alloc internals
    ours=[f for f in fr if re.search(r'kproxy|modes/',f)]
    keep=[]
    for f in fr:
        if re.search(r'(kproxy[_a-z]*::|/work/main)',f):
            keep.append(re.sub(r'^\[\w+\]\s*','',f)[:150])
            if len(keep)>=3: break
    return ' <- '.join(keep) or fr[min(3,len(fr)-1)][:150]
agg=collections.Counter(); cnt=collections.Counter()
for p in pps:
    if p.get('gb',0)==0: continue
    l=label(p); agg[l]+=p['gb']; cnt[l]+=p.get('gbk',0)
for l,b in agg.most_common(n):
    print("%7.1f MiB %8d blocks  %s"%(b/2**20,cnt[l],l))
